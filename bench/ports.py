"""Port creation throughput: 1,000 ports in one /20 subnet, timed from the
first create until every port is Ready (addresses allocated and its DHCP
host entry served by dnsmasq), with the controller's peak memory.

Runs a controller and one node agent (a simulated node: its own OVS in a
namespace) against the local control plane; prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import (
    api_writes,
    cpu_by_process,
    install_crds,
    namespace_gone,
    rss_mib,
    wait_for,
    writes_since,
)
from nubes.api.network import Network, Port, Subnet
from nubes.runtime.kube import NAMESPACES, Kube, path_of
from tests.helpers import Process, free_port
from tests.nodes import Fabric


async def run(count: int, concurrency: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-ports-"))
    fabric = Fabric.start(root, ["b1"])
    node = fabric.nodes[0]
    node_name = fabric.node_name(node)
    logs = root / "logs"
    controller = Process(
        "controller",
        ["controller", "--image-store", str(root / "images")],
        logs / "controller.log",
        free_port(),
    ).start()
    agent = Process(
        "agent",
        fabric.agent_argv(node, root / "agent"),
        logs / "agent.log",
        free_port(),
    ).start()
    kube = await Kube.connect(field_manager="bench")
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        await kube.create_raw(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        await kube.create_raw(
            path_of(Network),
            {
                "apiVersion": Network.crd.api_version,
                "kind": "Network",
                "metadata": {"name": "bench", "namespace": ns},
                "spec": {"type": "vxlan", "availabilityZoneHints": [fabric.prefix]},
            },
            ns,
        )
        await kube.create_raw(
            path_of(Subnet),
            {
                "apiVersion": "network.nubes.io/v1alpha1",
                "kind": "Subnet",
                "metadata": {"name": "bench-v4", "namespace": ns},
                "spec": {"network": {"name": "bench"}, "cidr": "10.64.0.0/20"},
            },
            ns,
        )
        await wait_for(lambda: network_ready(kube, ns), 120, "network with its DHCP server")

        semaphore = asyncio.Semaphore(concurrency)

        async def create(i: int) -> None:
            async with semaphore:
                await kube.create_raw(
                    path_of(Port),
                    {
                        "apiVersion": Port.crd.api_version,
                        "kind": "Port",
                        "metadata": {"name": f"p{i}", "namespace": ns},
                        "spec": {"network": {"name": "bench"}},
                    },
                    ns,
                )

        # Readiness is followed by a watch: polling lists of a thousand
        # ports would take the CPU the measured processes need.
        _, version = await kube.list_with_version(path_of(Port), lambda _raw: None)
        watching = asyncio.create_task(all_ready(kube, ns, count, version))
        assert controller.proc is not None and agent.proc is not None
        pids = {"controller": controller.proc.pid, "agent": agent.proc.pid}
        cpu_before = cpu_by_process(pids)
        writes_before = api_writes("network.nubes.io")
        started = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(count)))
        created = time.monotonic() - started
        await asyncio.wait_for(watching, 900)
        elapsed = time.monotonic() - started
        cpu = cpu_by_process(pids)
        writes = writes_since(writes_before, api_writes("network.nubes.io"))
        ports = await user_ports(kube, ns)
        ips = [p.status.fixed_ips[0].ip_address for p in ports if p.status.fixed_ips]
        macs = [p.status.mac_address for p in ports]
        duplicates = (len(ips) - len(set(ips))) + (len(macs) - len(set(macs)))
        served = sum(1 for p in ports if p.status.dhcp and p.status.dhcp.node == node_name)
        return {
            "ports": count,
            "ports_per_s": round(count / elapsed, 1),
            "seconds": round(elapsed, 2),
            "create_seconds": round(created, 2),
            "duplicates": duplicates,
            # Every write to network.nubes.io meanwhile (the creates included).
            "writes_per_port": round(sum(writes.values()) / count, 2),
            "writes_by_kind": writes,
            "dhcp_entries_served": served,
            # Where the time went: CPU seconds of each process over the run.
            "cpu_seconds": {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu.items()},
            "controller_peak_rss_mib": round(rss_mib(controller.proc.pid, "VmHWM"), 1),
            "agent_peak_rss_mib": round(rss_mib(agent.proc.pid, "VmHWM"), 1),
            "cpus": os.cpu_count(),
        }
    finally:
        await kube.delete_raw(NAMESPACES, ns)
        await asyncio.sleep(0)
        await wait_for(lambda: namespace_gone(kube, ns), 300, "bench namespace deleted")
        await kube.close()
        agent.stop()
        controller.stop()
        await asyncio.sleep(0)
        fabric.stop()
        shutil.rmtree(root, ignore_errors=True)


async def network_ready(kube: Kube, ns: str) -> bool:
    net = await kube.get(Network, "bench", ns)
    return bool(net and net.status.is_true("Ready") and net.status.dhcp_node)


async def all_ready(kube: Kube, ns: str, count: int, version: str) -> None:
    """Return once `count` user ports of `ns` are Ready, watching from `version`."""
    ready: set[str] = set()
    async for event in kube.watch_raw(path_of(Port), version, timeout=900):
        port = event.get("object", {})
        meta = port.get("metadata", {})
        if event.get("type") == "BOOKMARK" or meta.get("namespace") != ns:
            continue
        if port.get("spec", {}).get("deviceOwner") == "network:dhcp":
            continue
        conditions = port.get("status", {}).get("conditions", [])
        if event.get("type") != "DELETED" and any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            ready.add(meta["name"])
        else:
            ready.discard(meta["name"])
        if len(ready) >= count:
            return
    raise TimeoutError(f"the watch ended with {len(ready)} of {count} ports Ready")


async def user_ports(kube: Kube, ns: str) -> list[Port]:
    return [p for p in await kube.list(Port, ns) if p.spec.device_owner != "network:dhcp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    install_crds()
    result = asyncio.run(run(args.ports, args.concurrency))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
