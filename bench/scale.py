"""Memory and restart time at scale: 10,000 ports and 1,000 instances' worth
of objects (no guests) in the cluster, with one controller and one node
agent (a simulated node).

The ports are bound to other nodes (no agent runs for them) on networks
without DHCP, and the instances name an image that does not exist, so no
guest boots and nothing of them belongs to the measured agent: its memory
should not grow with them. Reported: the controller's RSS once everything is
processed (target 250 MiB), the agent's RSS before and after (target 120
MiB, and unaffected), and the time a restarted controller takes to load and
converge everything (its work queues drained and its reconcile counters
still). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import install_crds, namespace_gone, rss_mib, wait_for
from nubes.api.compute import Instance
from nubes.api.network import Network, Port, Subnet
from nubes.runtime.kube import NAMESPACES, Kube, path_of
from tests.helpers import Process, free_port
from tests.nodes import Fabric

NETWORKS = 10


def metrics(port: int) -> tuple[float, float]:
    """(work items queued, reconcile passes so far) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    queued = sum(float(v) for v in re.findall(r"^nubes_queue_depth\{.*\} (\S+)$", text, re.M))
    passes = sum(float(v) for v in re.findall(r"^nubes_reconcile_total\{.*\} (\S+)$", text, re.M))
    return queued, passes


async def settled(port: int, quiet: float = 3.0, timeout: float = 1800) -> float:
    """Seconds until the process has nothing queued and ran no reconcile
    pass for `quiet` seconds (that quiet time not counted)."""
    started = time.monotonic()
    last, since = -1.0, time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            queued, passes = metrics(port)
        except OSError:
            queued, passes = 1.0, -1.0  # not serving yet
        if queued or passes != last:
            last, since = passes, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return since - started
        await asyncio.sleep(0.5)
    raise TimeoutError("the controller did not settle")


async def create_all(
    kube: Kube, bodies: list[tuple[Any, dict[str, Any], str]], concurrency: int
) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(path: Any, body: dict[str, Any], ns: str) -> None:
        async with semaphore:
            await kube.create_raw(path, body, ns)

    await asyncio.gather(*(one(*b) for b in bodies))


def bodies(ns: str, ports: int, instances: int) -> list[tuple[Any, dict[str, Any], str]]:
    out: list[tuple[Any, dict[str, Any], str]] = []
    for n in range(NETWORKS):
        out.append(
            (
                path_of(Network),
                {
                    "apiVersion": Network.crd.api_version,
                    "kind": "Network",
                    "metadata": {"name": f"net{n}", "namespace": ns},
                    "spec": {"type": "vxlan"},
                },
                ns,
            )
        )
        out.append(
            (
                path_of(Subnet),
                {
                    "apiVersion": Subnet.crd.api_version,
                    "kind": "Subnet",
                    "metadata": {"name": f"net{n}-v4", "namespace": ns},
                    "spec": {
                        "network": {"name": f"net{n}"},
                        "cidr": f"10.{100 + n}.0.0/18",
                        "enableDhcp": False,
                    },
                },
                ns,
            )
        )
    for i in range(ports):
        out.append(
            (
                path_of(Port),
                {
                    "apiVersion": Port.crd.api_version,
                    "kind": "Port",
                    "metadata": {"name": f"p{i}", "namespace": ns},
                    "spec": {
                        "network": {"name": f"net{i % NETWORKS}"},
                        "binding": {"host": f"scale-other-{i % 50}"},
                    },
                },
                ns,
            )
        )
    for i in range(instances):
        out.append(
            (
                path_of(Instance),
                {
                    "apiVersion": Instance.crd.api_version,
                    "kind": "Instance",
                    "metadata": {"name": f"vm{i}", "namespace": ns},
                    "spec": {"flavor": "m1.tiny", "image": {"name": "scale-no-such-image"}},
                },
                ns,
            )
        )
    return out


async def run(ports: int, instances: int, concurrency: int) -> dict[str, Any]:
    install_crds()
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-scale-"))
    fabric = Fabric.start(root, ["s1"])
    logs = root / "logs"
    controller_port, agent_port = free_port(), free_port()
    controller_argv = ["controller", "--image-store", str(root / "images")]
    controller = Process("controller", controller_argv, logs / "controller.log", controller_port)
    controller.start()
    agent = Process(
        "agent", fabric.agent_argv(fabric.nodes[0], root / "agent"), logs / "agent.log", agent_port
    ).start()
    kube = await Kube.connect(field_manager="bench")
    ns = f"bench-scale-{uuid.uuid4().hex[:6]}"
    try:
        await settled(agent_port)
        assert agent.proc is not None and controller.proc is not None
        agent_before = rss_mib(agent.proc.pid)
        await kube.create_raw(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        started = time.monotonic()
        await create_all(kube, bodies(ns, ports, instances), concurrency)
        created = time.monotonic() - started
        await settled(controller_port)
        processed = time.monotonic() - started
        await settled(agent_port)
        controller_rss = rss_mib(controller.proc.pid)
        agent_after = rss_mib(agent.proc.pid)

        controller.stop()
        restarted = time.monotonic()
        controller = Process("controller", controller_argv, logs / "again.log", controller_port)
        controller.start()  # returns once healthy: every kind listed
        loaded = time.monotonic() - restarted
        converge = loaded + await settled(controller_port)
        assert controller.proc is not None
        return {
            "benchmark": "scale",
            "ports": ports,
            "instances": instances,
            "create_seconds": round(created, 1),
            "processed_seconds": round(processed, 1),
            "controller_rss_mib": round(controller_rss, 1),
            "controller_rss_after_restart_mib": round(rss_mib(controller.proc.pid), 1),
            "agent_rss_before_mib": round(agent_before, 1),
            "agent_rss_after_mib": round(agent_after, 1),
            "restart_loaded_seconds": round(loaded, 1),
            "restart_converge_seconds": round(converge, 1),
            "targets": {"controller_rss_mib": 250, "agent_rss_mib": 120},
        }
    finally:
        await kube.delete_raw(NAMESPACES, ns)
        await wait_for(lambda: namespace_gone(kube, ns), 900, "bench namespace deleted")
        await kube.close()
        agent.stop()
        controller.stop()
        fabric.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.ports, args.instances, args.concurrency))))


if __name__ == "__main__":
    main()
