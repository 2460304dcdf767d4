"""Floating IPs and L3 failover: the time from applying a FloatingIP (bound
to a guest's port) to the first reply from the guest through it, as the
external host sees it, p50/p95 over repeated associations; and the time for
SNAT and the floating IP to work again after the router's node dies.

Two simulated L3 nodes (each its own OVS in a namespace, vxlan between them,
the external network a flat provider network on the shared fabric), an
external host on the fabric, one namespace guest running the echo service
of tests/echo.py, a controller and two agents against the local control
plane. A node dies as in test_routing: its agent stops and its uplink goes
down; recovery waits out the agents' heartbeat timeout (60 s, as Nova's
service_down_time), which dominates it. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.cluster import install_crds, namespace_gone, wait_for
from nubes.api.network import FloatingIP, Network, Port, Router, SecurityGroup, Subnet
from nubes.runtime.kube import NAMESPACES, KindPath, Kube, path_of
from tests.echo import SERVICE_PORT, ask, serve
from tests.helpers import Process, free_port
from tests.integration.cloud import plugger
from tests.nodes import Fabric, SimNode, dhcp_lease, sh

UPSTREAM = "203.0.113.1"


def body(kind: type[Any], name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": kind.crd.api_version,
        "kind": kind.crd.kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


async def create(kube: Kube, kind: type[Any], name: str, ns: str, spec: dict[str, Any]) -> None:
    await kube.create_raw(path_of(kind), body(kind, name, ns, spec), ns)


async def ready(kube: Kube, kind: type[Any], name: str, ns: str, timeout: float = 120) -> Any:
    async def probe() -> Any:
        obj = await kube.get(kind, name, ns)
        return obj if obj is not None and obj.status.is_true("Ready") else None

    return await wait_for(probe, timeout, f"{kind.crd.kind} {ns}/{name} Ready")


async def reaches(netns: str, address: str, timeout: float) -> float:
    """Seconds until `address` answers the echo service from `netns`."""
    began = time.monotonic()
    while ask(netns, address, timeout=0.5) is None:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{address} unreachable from {netns}")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


def agent(fabric: Fabric, node: SimNode, root: Path) -> Process:
    argv = fabric.agent_argv(node, root / f"agent-{node.name}")
    argv += ["--bridge-mapping", "physnet1:br-phy", "--l3"]
    return Process(
        f"agent-{node.name}", argv, root / "logs" / f"agent-{node.name}.log", free_port()
    ).start()


async def run(associations: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-l3-"))
    fabric = Fabric.start(root, ["l1", "l2"])
    controller = Process(
        "controller",
        ["controller", "--image-store", str(root / "images")],
        root / "logs" / "controller.log",
        free_port(),
    ).start()
    agents = {n.name: agent(fabric, n, root) for n in fabric.nodes}
    upstream = fabric.host("upstream", f"{UPSTREAM}/24")
    kube = await Kube.connect(field_manager="bench")
    ext, ns = f"bench-ext-{uuid.uuid4().hex[:6]}", f"bench-l3-{uuid.uuid4().hex[:6]}"
    servers = [serve(upstream, "upstream")]
    guest_port: Port | None = None
    guest_node = fabric.nodes[0]
    try:
        for name in (ext, ns):
            await kube.create_raw(
                NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        zone = {"availabilityZoneHints": [fabric.prefix]}
        await create(kube, Network, "public", ext, {"type": "flat", "physicalNetwork": "physnet1",
                                                    "external": True, **zone})  # fmt: skip
        await create(kube, Subnet, "public-v4", ext, {
            "network": {"name": "public"}, "cidr": "203.0.113.0/24", "gatewayIp": UPSTREAM,
            "enableDhcp": False,
            "allocationPools": [{"start": "203.0.113.10", "end": "203.0.113.90"}],
        })  # fmt: skip
        await create(kube, Network, "blue", ns, {"type": "vxlan", **zone})
        await create(kube, Subnet, "blue-v4", ns, {"network": {"name": "blue"},
                                                   "cidr": "10.0.0.0/24"})  # fmt: skip
        await create(kube, SecurityGroup, "service", ns, {"rules": [
            {"protocol": "tcp", "portRangeMin": SERVICE_PORT, "portRangeMax": SERVICE_PORT,
             "remoteIpPrefix": "0.0.0.0/0"}]})  # fmt: skip
        await create(kube, Router, "r1", ns, {
            "interfaces": [{"subnet": "blue-v4"}],
            "externalGateway": {"network": {"name": "public", "namespace": ext}},
        })  # fmt: skip
        await ready(kube, Router, "r1", ns)
        # The guest sits on the node that does not hold the router, so the
        # floating IP's traffic crosses the tunnel as in a real cloud.
        router = await kube.get(Router, "r1", ns)
        assert router is not None
        guest_node = next(n for n in fabric.nodes if fabric.node_name(n) != router.status.node)
        await create(kube, Port, "g1", ns, {
            "network": {"name": "blue"}, "binding": {"host": fabric.node_name(guest_node)},
            "securityGroups": ["default", "service"],
        })  # fmt: skip

        async def addressed() -> Port | None:
            p = await kube.get(Port, "g1", ns)
            return p if p is not None and p.status.mac_address and p.status.fixed_ips else None

        guest_port = await wait_for(addressed, 60, "guest port addressed")
        guest = fabric.guest("g1")
        await asyncio.to_thread(
            plugger(guest_node).plug_netns,
            guest_port.uid,
            guest_port.status.mac_address or "",
            guest_port.status.mtu or 1500,
            guest,
        )
        await ready(kube, Port, "g1", ns)
        dhcp_lease(guest)
        servers.append(serve(guest, "g1"))

        fips = path_of(FloatingIP)
        latencies: list[float] = []
        address = ""
        for i in range(associations):
            name = f"fip{i}"
            began = time.monotonic()
            await create(kube, FloatingIP, name, ns, {
                "floatingNetwork": {"name": "public", "namespace": ext}, "port": "g1"})  # fmt: skip

            async def allocated(name: str = name) -> str | None:
                f = await kube.get(FloatingIP, name, ns)
                return f.status.floating_ip_address if f is not None else None

            # Polled at 20 ms: the latency measured includes this poll.
            address = await wait_for(allocated, 30, f"{name} address", interval=0.02)
            await reaches(upstream, address, 30)
            latencies.append(time.monotonic() - began)
            if i < associations - 1:
                await kube.delete_raw(fips, name, ns)
                await wait_gone(kube, fips, name, ns)

        # The router's node dies; time until both directions work again.
        victim = next(n for n in fabric.nodes if n is not guest_node)
        agents[victim.name].stop()
        sh("ip", "-n", victim.netns, "link", "set", f"ul{fabric.nodes.index(victim) + 1}", "down")
        died = time.monotonic()
        await reaches(upstream, address, 300)
        await reaches(guest, UPSTREAM, 60)
        failover = time.monotonic() - died
        latencies.sort()
        return {
            "associations": associations,
            "fip_to_reply_p50_s": round(statistics.median(latencies), 3),
            "fip_to_reply_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "fip_to_reply_max_s": round(latencies[-1], 3),
            "l3_failover_s": round(failover, 1),
            "heartbeat_timeout_s": 60,
            "cpus": os.cpu_count(),
        }
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for name in (ns, ext):
            await kube.delete_raw(NAMESPACES, name)
        for name in (ns, ext):
            await wait_for(lambda name=name: namespace_gone(kube, name), 300, f"{name} deleted")
        if guest_port is not None:
            await asyncio.to_thread(plugger(guest_node).unplug, guest_port.uid)
        await kube.close()
        for proc in agents.values():
            proc.stop()
        controller.stop()
        fabric.stop()
        shutil.rmtree(root, ignore_errors=True)


async def wait_gone(kube: Kube, kp: KindPath, name: str, ns: str) -> None:
    async def gone() -> bool:
        return await kube.get_raw(kp, name, ns) is None

    await wait_for(gone, 60, f"{name} deleted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--associations", type=int, default=20)
    args = parser.parse_args()
    install_crds()
    result = asyncio.run(run(args.associations))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
