"""One project's broken DHCP server does not stop another project's guest on
the same node from getting its lease, and the broken network says why.

Nothing a tenant writes can make dnsmasq refuse to start any more (the API
server refuses the settings dnsmasq rejects: a DNS server of the other IP
family, an option 121 longer than a DHCP option holds), so the failure is a
host condition: a process already holds the DHCP port in the network's DHCP
namespace, and dnsmasq exits with "Address already in use". Before the fix
the agent's one loop over all networks stopped at that error, so no other
network's DHCP entries were reported (and later networks not served)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from nubes.api.network import Network, Port
from nubes.drivers.network.dhcp import names_for
from nubes.runtime.kube import Kube
from tests.helpers import Process, eventually, kubectl
from tests.integration.cloud import (
    condition,
    network,
    node_name,
    plugger,
    port,
    start_agent,
    subnet,
)
from tests.nodes import Fabric, dhcp_lease, sh

SQUATTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 67))
print("bound", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["n1"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agent(fabric: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_agent(fabric, fabric.nodes[0], tmp_path_factory)
    try:
        yield proc
    finally:
        proc.stop()
        kubectl("delete", "hypervisor", node_name(fabric, fabric.nodes[0]), "--ignore-not-found")
    proc.assert_no_crash()


def squat_dhcp_port(netns: str) -> subprocess.Popen[str]:
    """A process holding UDP port 67 in `netns` until its stdin closes."""
    sh("ip", "netns", "add", netns)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SQUATTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    proc.wait(timeout=10)


async def test_broken_dhcp_server_is_reported_and_others_are_served(
    kube: Kube, controller: Process, agent: Process, fabric: Fabric
) -> None:
    node = fabric.nodes[0]
    host = node_name(fabric, node)
    ns_bad, ns_good = f"db-{uuid.uuid4().hex[:6]}", f"dg-{uuid.uuid4().hex[:6]}"
    for ns in (ns_bad, ns_good):
        kubectl("create", "namespace", ns)
    squatter = None
    try:
        # The broken network comes first, so it is first in the agent's pass.
        network(ns_bad, "broken", fabric, type="vxlan")
        broken = await kube.get(Network, "broken", ns_bad)
        assert broken is not None
        dhcp_netns = names_for(broken.uid, f"{fabric.prefix}{node.name}")[0]
        squatter = squat_dhcp_port(dhcp_netns)
        subnet(ns_bad, "broken-v4", "broken", "10.70.0.0/24")

        network(ns_good, "good", fabric, type="vxlan")
        subnet(ns_good, "good-v4", "good", "10.70.0.0/24")
        port(ns_good, "g1", "good", host, fixedIps=[{"ipAddress": "10.70.0.21"}])

        stalled = await condition(kube, Network, "broken", ns_bad, type_="Stalled", timeout=60)
        cond = stalled.status.condition("Stalled")
        assert cond.reason == "DhcpFailed", cond
        assert "dnsmasq did not start" in cond.message, cond.message
        assert "Address already in use" in cond.message, cond.message
        assert stalled.status.dhcp is not None and stalled.status.dhcp.node == host
        assert not stalled.status.dhcp.running

        # The other project's guest is served all the same.
        async def addressed() -> Port | None:
            got = await kube.get(Port, "g1", ns_good)
            return got if got is not None and got.status.mac_address else None

        # The broken network can stall before the other project's port has
        # its addresses: they come on their own schedule.
        g1 = await eventually(addressed, timeout=60, what="port g1 addressed")
        guest = fabric.guest(f"g1{uuid.uuid4().hex[:4]}")
        plugger(node).plug_netns(g1.uid, g1.status.mac_address, g1.status.mtu or 1500, guest)
        await condition(kube, Port, "g1", ns_good, timeout=60)
        assert dhcp_lease(guest).get("ip") == "10.70.0.21"
        good = await condition(kube, Network, "good", ns_good)
        assert good.status.dhcp is not None and good.status.dhcp.running

        # Once the host condition is gone the agent's next passes recover it.
        release(squatter)
        squatter = None

        async def recovered() -> Network | None:
            net = await kube.get(Network, "broken", ns_bad)
            ok = net is not None and net.status.is_true("Ready") and net.status.dhcp
            return net if ok and net.status.dhcp.running else None  # type: ignore[union-attr]

        await eventually(recovered, timeout=90, what="broken network's DHCP server started")
        plugger(node).unplug(g1.uid)
    finally:
        if squatter is not None:
            release(squatter)
        for ns in (ns_bad, ns_good):
            kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false")

    async def removed() -> bool:
        for ns in (ns_bad, ns_good):
            if await kube.list(Network, ns):
                return False
        return not any("-dhcp-" in n for n in fabric.namespaces())

    await eventually(removed, timeout=60, what="networks and DHCP namespaces removed")
    for ns in (ns_bad, ns_good):
        kubectl("delete", "namespace", ns, "--wait=false")
