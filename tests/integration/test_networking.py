"""Networks, subnets and ports end to end: the controller (IPAM, segments,
DHCP placement), two node agents acting as two nodes (each its own OVS in a
namespace, vxlan between them over a fabric), dnsmasq, and namespaces as
guests that get their Port's address by DHCP."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.network import Allocation, Network, Port, Subnet
from nubes.controllers.ipam import derived_mac
from nubes.runtime.kube import ApiError, Kube, path_of
from nubes.runtime.status_apply import (
    AGENT_PREFIX,
    CONTROLLER,
    apply_body,
    conflicting_managers,
    owned_fields,
)
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
from tests.integration.identity import agent_kubeconfig
from tests.nodes import Fabric, dhcp_lease, ping, sh


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["n1", "n2"])
    yield fab
    fab.stop()


# physnet1 is each node's br-phy, whose uplink is the shared fabric.
MAPPINGS = ("physnet1:br-phy",)


@pytest.fixture(scope="module")
def agents(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    procs = {
        n.name: start_agent(fabric, n, tmp_path_factory, bridge_mappings=MAPPINGS)
        for n in fabric.nodes
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        for node in fabric.nodes:
            kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")
    for proc in procs.values():
        proc.assert_no_crash()


async def test_guests_get_their_port_by_dhcp_and_networks_are_isolated(
    kube: Kube, controller: Process, agents: dict[str, Process], fabric: Fabric, tmp_path: Path
) -> None:
    n1, n2 = fabric.nodes
    h1, h2 = node_name(fabric, n1), node_name(fabric, n2)
    ns_a, ns_b = f"na-{uuid.uuid4().hex[:6]}", f"nb-{uuid.uuid4().hex[:6]}"
    for ns in (ns_a, ns_b):
        kubectl("create", "namespace", ns)
    try:
        network(ns_a, "blue", fabric, type="vxlan")
        subnet(
            ns_a,
            "blue-v4",
            "blue",
            "10.0.0.0/24",
            dnsNameservers=["10.0.0.53"],
            hostRoutes=[{"destination": "192.168.7.0/24", "nexthop": "10.0.0.254"}],
        )
        network(ns_a, "green", fabric, type="vxlan")
        subnet(ns_a, "green-v4", "green", "10.0.0.0/24")
        # Another project with the very same CIDR and the same addresses.
        network(ns_b, "blue", fabric, type="vxlan")
        subnet(ns_b, "blue-v4", "blue", "10.0.0.0/24")

        # Fixed addresses so that each isolation probe targets an address that
        # does not exist on the prober's own network.
        port(ns_a, "a1", "blue", h1, fixedIps=[{"ipAddress": "10.0.0.201"}])
        port(ns_a, "a2", "blue", h2, fixedIps=[{"ipAddress": "10.0.0.202"}])
        port(ns_a, "g1", "green", h2, fixedIps=[{"ipAddress": "10.0.0.203"}])
        port(ns_b, "b1", "blue", h1, fixedIps=[{"ipAddress": "10.0.0.202"}])
        net_blue = await condition(kube, Network, "blue", ns_a)
        assert net_blue.status.mtu == 1450
        assert net_blue.status.dhcp_node in (h1, h2)
        a2_ip = "10.0.0.202"

        guests = {}
        for ns, name, node in (
            (ns_a, "a1", n1),
            (ns_a, "a2", n2),
            (ns_a, "g1", n2),
            (ns_b, "b1", n1),
        ):
            p = await kube.get(Port, name, ns)
            assert p is not None and p.status.mac_address
            netns = fabric.guest(f"{ns[:2]}{name}")
            plugger(node).plug_netns(p.uid, p.status.mac_address, p.status.mtu or 1500, netns)
            guests[(ns, name)] = netns
        ports = {}
        for ns, name in guests:
            ports[(ns, name)] = await condition(kube, Port, name, ns, timeout=60)

        await _status_fields_have_one_writer_each(kube, ports[(ns_a, "a2")], tmp_path)

        for (ns, name), netns in guests.items():
            p = ports[(ns, name)]
            lease = dhcp_lease(netns)
            assert lease.get("ip") == p.status.fixed_ips[0].ip_address, (name, lease)
            assert lease["router"] == "10.0.0.1"
            assert lease["mtu"] == "1450"
        lease = dhcp_lease(guests[(ns_a, "a1")])
        assert lease["dns"] == "10.0.0.53"
        assert "192.168.7.0/24 10.0.0.254" in lease["staticroutes"]

        a1, g1 = guests[(ns_a, "a1")], guests[(ns_a, "g1")]
        assert ping(a1, a2_ip), "a1 (node 1) must reach a2 (node 2) over vxlan"
        neigh = sh("ip", "-n", a1, "neigh", "show", a2_ip).stdout
        assert ports[(ns_a, "a2")].status.mac_address in neigh, "reached the other project's twin"
        assert not ping(a1, ports[(ns_a, "g1")].status.fixed_ips[0].ip_address, count=1)
        assert not ping(g1, ports[(ns_a, "a1")].status.fixed_ips[0].ip_address, count=1)
        assert not ping(
            guests[(ns_b, "b1")], ports[(ns_a, "a1")].status.fixed_ips[0].ip_address, count=1
        )

        # Restarting an agent changes nothing that works and re-adopts it.
        dhcp_node = next(
            n for n in fabric.nodes if node_name(fabric, n) == net_blue.status.dhcp_node
        )
        pids_before = _dnsmasq_pids(fabric)
        agents[dhcp_node.name].stop()
        agents[dhcp_node.name] = start_agent(
            fabric, dhcp_node, _factory(tmp_path), bridge_mappings=MAPPINGS
        )
        await condition(kube, Port, "a1", ns_a)
        assert _dnsmasq_pids(fabric) == pids_before
        assert ping(a1, a2_ip)
        assert dhcp_lease(guests[(ns_a, "a2")]).get("ip") == a2_ip

        for ns, name in guests:
            p = ports[(ns, name)]
            node = n1 if p.spec.binding.host == h1 else n2
            plugger(node).unplug(p.uid)
    finally:
        for ns in (ns_a, ns_b):
            kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false")
    await _everything_removed(kube, fabric, [ns_a, ns_b])
    for ns in (ns_a, ns_b):
        kubectl("delete", "namespace", ns, "--wait=false")


async def test_provider_networks_reach_the_other_node(
    kube: Kube, controller: Process, agents: dict[str, Process], fabric: Fabric, namespace: str
) -> None:
    """vlan and flat networks leave through the physical network's bridge
    (tagged with the provider VLAN, or untagged) and meet on the fabric."""
    ns = namespace
    n1, n2 = fabric.nodes
    network(ns, "vl", fabric, type="vlan", physicalNetwork="physnet1", segmentationId=123)
    network(ns, "fl", fabric, type="flat", physicalNetwork="physnet1")
    for net in ("vl", "fl"):
        subnet(ns, f"{net}-v4", net, "10.61.0.0/24", enableDhcp=False)  # the same CIDR twice
    guests = {}
    for net, name, node in (("vl", "v1", n1), ("vl", "v2", n2), ("fl", "f1", n1), ("fl", "f2", n2)):
        ip = {"v1": "10.61.0.11", "v2": "10.61.0.12", "f1": "10.61.0.21", "f2": "10.61.0.12"}[name]
        port(ns, name, net, node_name(fabric, node), fixedIps=[{"ipAddress": ip}])
        p = await condition(kube, Port, name, ns, type_="Reconciling", timeout=60)
        netns = fabric.guest(f"{name}{uuid.uuid4().hex[:4]}")
        plugger(node).plug_netns(p.uid, p.status.mac_address or "", p.status.mtu or 1500, netns)
        sh("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        guests[name] = (netns, node, p)
    for name in guests:
        await condition(kube, Port, name, ns, timeout=60)
    vl = await kube.get(Network, "vl", ns)
    assert vl is not None and vl.status.mtu == 1500 and vl.status.segmentation_id == 123
    assert ping(guests["v1"][0], "10.61.0.12"), "vlan network across nodes"
    neigh = sh("ip", "-n", guests["v1"][0], "neigh", "show", "10.61.0.12").stdout
    assert (guests["v2"][2].status.mac_address or "") in neigh, "reached the flat twin instead"
    assert ping(guests["f1"][0], "10.61.0.12"), "flat network across nodes"
    assert not ping(guests["f1"][0], "10.61.0.11", count=1), "flat must not reach the vlan"
    flows = n1.ofctl("dump-flows", "br-phy")
    # OpenFlow 1.3 shows the tag as a field set to 4096 | 123 (the "present" bit).
    assert re.search(r"n_packets=[1-9]\d*.*actions=set_field:4219->vlan_vid", flows), flows
    for _, node, p in guests.values():
        plugger(node).unplug(p.uid)
    kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false")


async def _status_fields_have_one_writer_each(kube: Kube, port: Port, tmp_path: Path) -> None:
    """The API server records each status field's writer (server-side apply),
    and refuses an agent that writes a field of the controller's."""
    raw = await kube.get_raw(path_of(Port), port.name, port.namespace)
    assert raw is not None
    owned = {
        e["manager"]: owned_fields(raw["metadata"]["managedFields"], e["manager"])
        for e in raw["metadata"]["managedFields"]
        if e.get("subresource") == "status"
    }
    host, dhcp = port.status.host, port.status.dhcp_node
    assert host and dhcp
    assert {"macAddress", "fixedIps", "conditions", "observedGeneration"} <= owned[CONTROLLER]
    assert "binding" in owned[AGENT_PREFIX + host], owned
    assert "dhcp" in owned[AGENT_PREFIX + dhcp], owned
    assert not owned[CONTROLLER] & (owned[AGENT_PREFIX + host] | owned[AGENT_PREFIX + dhcp])

    kubeconfig = agent_kubeconfig(tmp_path, host)
    async with await Kube.connect(str(kubeconfig), field_manager=AGENT_PREFIX + host) as agent:
        body = apply_body(raw, agent.field_manager, {"macAddress": "fa:16:3e:66:66:66"})
        assert body is not None
        with pytest.raises(ApiError) as refused:
            await agent.apply_status(Port, body, force=False)
        assert conflicting_managers(refused.value) == [CONTROLLER], refused.value
    fresh = await kube.get(Port, port.name, port.namespace)
    assert fresh is not None and fresh.status.mac_address == port.status.mac_address


def _factory(tmp_path: Path) -> Any:
    class Factory:
        def mktemp(self, name: str) -> Path:
            path = tmp_path / f"{name}-{uuid.uuid4().hex[:4]}"
            path.mkdir()
            return path

    return Factory()


def _dnsmasq_pids(fabric: Fabric) -> set[int]:
    out = sh("pgrep", "-f", f"dnsmasq.*{fabric.root}", check=False).stdout
    return {int(x) for x in out.split()}


async def _everything_removed(kube: Kube, fabric: Fabric, namespaces: list[str]) -> None:
    async def clean() -> bool:
        for ns in namespaces:
            for kind in (Port, Subnet, Network):
                if await kube.list(kind, ns):
                    return False
        if _dnsmasq_pids(fabric):
            return False
        if any("-dhcp-" in n for n in fabric.namespaces()):
            return False
        for node in fabric.nodes:
            ports = node.vsctl("list-ports", "br-int").split()
            if [p for p in ports if p.startswith(("dh", "vg", "qvo"))]:
                return False
        return True

    await eventually(clean, timeout=60, what="networks, DHCP servers and OVS ports removed")
    allocations = await kube.list(Allocation)
    owners = {a.spec.owner.namespace for a in allocations}
    assert not owners & set(namespaces), "allocations left behind"


async def test_bad_input_and_lifecycle(
    kube: Kube, controller: Process, agents: dict[str, Process], fabric: Fabric, namespace: str
) -> None:
    ns = namespace
    network(ns, "tiny", fabric, type="vxlan")
    subnet(
        ns,
        "tiny-v4",
        "tiny",
        "10.1.0.0/24",
        enableDhcp=False,
        allocationPools=[{"start": "10.1.0.10", "end": "10.1.0.11"}],
    )
    await condition(kube, Subnet, "tiny-v4", ns)
    port(ns, "p1", "tiny")
    port(ns, "p2", "tiny")
    p1 = await condition(kube, Port, "p1", ns)
    await condition(kube, Port, "p2", ns)
    port(ns, "p3", "tiny")
    stalled = await condition(kube, Port, "p3", ns, type_="Stalled")
    cond = stalled.status.condition("Stalled")
    assert cond.reason == "IpAddressExhausted"
    assert "tiny-v4" in cond.message and "2 of 2" in cond.message

    # Addresses return to the pool on delete.
    kubectl("delete", "port", "p2", "-n", ns)
    p3 = await condition(kube, Port, "p3", ns)
    assert p3.status.fixed_ips[0].ip_address in ("10.1.0.10", "10.1.0.11")

    port(ns, "dup-ip", "tiny", fixedIps=[{"ipAddress": p1.status.fixed_ips[0].ip_address}])
    cond = (await condition(kube, Port, "dup-ip", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "IpAddressInUse" and f"{ns}/p1" in cond.message

    # p1's MAC stands for its IPv4 address; a given MAC is claimed.
    assert p1.status.mac_address == derived_mac(p1.status.fixed_ips[0].ip_address)
    port(ns, "own-mac", "tiny", macAddress="fa:16:3e:12:34:56", fixedIps=[])
    await condition(kube, Port, "own-mac", ns)
    port(ns, "dup-mac", "tiny", macAddress="FA:16:3E:12:34:56", fixedIps=[])
    cond = (await condition(kube, Port, "dup-mac", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "MacAddressInUse" and f"{ns}/own-mac" in cond.message

    network(ns, "fat", fabric, type="vxlan", mtu=1500)
    cond = (await condition(kube, Network, "fat", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "MtuTooLarge" and "1450" in cond.message

    tiny = await kube.get(Network, "tiny", ns)
    assert tiny is not None
    network(ns, "twin", fabric, type="vxlan", segmentationId=tiny.status.segmentation_id)
    cond = (await condition(kube, Network, "twin", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "SegmentationIdInUse" and f"{ns}/tiny" in cond.message

    network(ns, "gre", fabric, type="gre")
    gre = await condition(kube, Network, "gre", ns)
    assert gre.status.mtu == 1458

    # A network with ports is not deleted under them.
    kubectl("delete", "network", "tiny", "-n", ns, "--wait=false")
    waiting = await condition(kube, Network, "tiny", ns, type_="Reconciling")
    cond = waiting.status.condition("Reconciling")
    assert cond.reason == "InUse" and f"{ns}/p1" in cond.message
    kubectl("delete", "ports", "--all", "-n", ns)

    async def gone() -> bool:
        return await kube.get(Network, "tiny", ns) is None

    await eventually(gone, timeout=30, what="network deleted after its ports")


async def test_a_port_keeps_its_mac_when_its_address_changes(
    kube: Kube, controller: Process, agents: dict[str, Process], fabric: Fabric, namespace: str
) -> None:
    ns = namespace
    network(ns, "moving", fabric, type="vxlan")
    subnet(ns, "moving-v4", "moving", "10.2.0.0/24", enableDhcp=False)
    await condition(kube, Subnet, "moving-v4", ns)
    port(ns, "m1", "moving")
    m1 = await condition(kube, Port, "m1", ns)
    first = m1.status.fixed_ips[0].ip_address
    assert m1.status.mac_address == derived_mac(first)
    kubectl(
        "patch", "port", "m1", "-n", ns, "--type", "merge",
        "-p", json.dumps({"spec": {"fixedIps": [{"ipAddress": "10.2.0.50"}]}}),
    )  # fmt: skip

    async def moved() -> Port | None:
        now = await kube.get(Port, "m1", ns)
        addresses = [f.ip_address for f in now.status.fixed_ips] if now else []
        return now if addresses == ["10.2.0.50"] and now and now.status.is_true("Ready") else None

    assert (
        await eventually(moved, what="m1 on 10.2.0.50")
    ).status.mac_address == m1.status.mac_address
    # The address its MAC stands for stays m1's, so no port can derive that MAC.
    port(ns, "m2", "moving", fixedIps=[{"ipAddress": first}])
    cond = (await condition(kube, Port, "m2", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "IpAddressInUse" and f"{ns}/m1" in cond.message
    kubectl("delete", "port", "m1", "-n", ns)
    m2 = await condition(kube, Port, "m2", ns)
    assert m2.status.mac_address == derived_mac(first)
    kubectl("delete", "ports", "--all", "-n", ns)
