"""Routers, external networks, SNAT and floating IPs end to end (Tempest's
network_basic_ops): the controller, two L3 node agents on simulated nodes
(each its own OVS in a namespace, vxlan between them, the external network a
flat provider network on the shared fabric), namespace guests, and an
external host: a namespace on the fabric holding the external subnet's
gateway address, standing in for the upstream router.

What each side sees is checked with a tiny TCP service that answers every
connection with the address it came from."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nubes.api.network import Allocation, FloatingIP, Port, Router
from nubes.runtime.kube import Kube
from tests.echo import SERVICE_PORT, ask, serve
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    NET,
    condition,
    network,
    node_name,
    plugger,
    port,
    start_agent,
    subnet,
)
from tests.nodes import Fabric, SimNode, dhcp_lease, ping, sh

MAPPINGS = ("physnet1:br-phy",)
EXT_CIDR = "203.0.113.0/24"
UPSTREAM = "203.0.113.1"


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["n1", "n2"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agents(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    procs = {n.name: l3_agent(fabric, n, tmp_path_factory) for n in fabric.nodes}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        for node in fabric.nodes:
            kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")


def l3_agent(fabric: Fabric, node: SimNode, factory: pytest.TempPathFactory) -> Process:
    return start_agent(fabric, node, factory, bridge_mappings=MAPPINGS, extra_args=("--l3",))


@pytest.fixture(scope="module")
def upstream(fabric: Fabric) -> Iterator[str]:
    """The external host: on the fabric (where flat physnet1 traffic goes),
    with the external subnet's gateway address."""
    netns = fabric.host("upstream", f"{UPSTREAM}/24")
    server = serve(netns, "upstream")
    try:
        yield netns
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def external(fabric: Fabric, controller: Process) -> Iterator[str]:
    """The cloud admin's external network, in its own namespace."""
    ns = f"ext-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    network(ns, "public", fabric, type="flat", physicalNetwork="physnet1", external=True)
    subnet(
        ns,
        "public-v4",
        "public",
        EXT_CIDR,
        gatewayIp=UPSTREAM,
        enableDhcp=False,
        allocationPools=[{"start": "203.0.113.10", "end": "203.0.113.40"}],
    )
    try:
        yield ns
    finally:
        kubectl("delete", "subnets,networks", "--all", "-n", ns, "--wait=false")
        kubectl("delete", "namespace", ns, "--wait=false")


def gateway_to(ext_ns: str) -> dict[str, Any]:
    return {"network": {"name": "public", "namespace": ext_ns}}


def router(ns: str, name: str, subnets: list[str], ext_ns: str | None, **spec: Any) -> None:
    body: dict[str, Any] = {"interfaces": [{"subnet": s} for s in subnets], **spec}
    if ext_ns:
        body["externalGateway"] = gateway_to(ext_ns)
    apply({"apiVersion": NET, "kind": "Router", "metadata": {"name": name, "namespace": ns},
           "spec": body})  # fmt: skip


def floating_ip(ns: str, name: str, ext_ns: str, port_name: str | None, **spec: Any) -> None:
    body: dict[str, Any] = {"floatingNetwork": {"name": "public", "namespace": ext_ns}, **spec}
    if port_name:
        body["port"] = port_name
    apply({"apiVersion": NET, "kind": "FloatingIP",
           "metadata": {"name": name, "namespace": ns}, "spec": body})  # fmt: skip


async def guest(
    kube: Kube, fabric: Fabric, ns: str, name: str, net: str, node: SimNode
) -> tuple[str, Port, subprocess.Popen[bytes]]:
    """A namespace guest on `node` with its lease applied and the service running."""
    # The test service is open to the outside, as Tempest opens SSH: the
    # project's default group admits only its own members.
    apply({"apiVersion": NET, "kind": "SecurityGroup",
           "metadata": {"name": "service", "namespace": ns},
           "spec": {"rules": [{"protocol": "tcp", "portRangeMin": SERVICE_PORT,
                               "portRangeMax": SERVICE_PORT,
                               "remoteIpPrefix": "0.0.0.0/0"}]}})  # fmt: skip
    port(ns, name, net, node_name(fabric, node), securityGroups=["default", "service"])
    p = await condition(kube, Port, name, ns, type_="Reconciling", timeout=60)
    netns = fabric.guest(f"{name}{uuid.uuid4().hex[:4]}")
    plugger(node).plug_netns(p.uid, p.status.mac_address or "", p.status.mtu or 1500, netns)
    p = await condition(kube, Port, name, ns, timeout=60)
    lease = dhcp_lease(netns)
    assert lease.get("ip") == p.status.fixed_ips[0].ip_address, lease
    return netns, p, serve(netns, name)


async def ready(
    kube: Kube, kind: type[Any], name: str, ns: str, type_: str = "Ready", timeout: float = 90
) -> Any:
    """`condition`, showing the object and its ports when it times out."""
    try:
        return await condition(kube, kind, name, ns, type_=type_, timeout=timeout)
    except AssertionError as e:
        shown = kubectl("get", kind.crd.plural, name, "-n", ns, "-o", "yaml", check=False).stdout
        ports = kubectl("get", "ports", "-A", "-o", "wide", check=False).stdout
        raise AssertionError(f"{e}\n{shown}\n{ports}") from None


def ip_of(p: Port) -> str:
    return p.status.fixed_ips[0].ip_address


async def answer(netns: str, address: str, timeout: float = 30) -> tuple[str, str]:
    async def probe() -> tuple[str, str] | None:
        return ask(netns, address, timeout=2)

    try:
        return await eventually(
            probe, timeout=timeout, interval=0.5, what=f"{address} from {netns}"
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diagnostics(netns)}") from None


def diagnostics(*netns: str) -> str:
    """Addresses, routes, neighbours and NAT counters of the namespaces
    involved (guest, routers, external host), for a failed reachability check."""
    out = []
    spaces = [n for n in os.listdir("/run/netns") if "-qrouter-" in n or "-g-upstream" in n]
    for n in [*netns, *spaces]:
        for argv in (
            ("ip", "-br", "addr"),
            ("ip", "route"),
            ("ip", "neigh"),
            ("iptables-save", "-c"),
        ):
            out.append(f"## {n}: {' '.join(argv)}\n" + sh(*argv, netns=n, check=False).stdout)
    return "\n".join(out)


async def test_snat_floating_ips_and_two_subnets(
    kube: Kube,
    controller: Process,
    agents: dict[str, Process],
    fabric: Fabric,
    upstream: str,
    external: str,
    namespace: str,
) -> None:
    ns, other = namespace, f"tb-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", other)
    n1, n2 = fabric.nodes
    servers: list[subprocess.Popen[bytes]] = []
    try:
        network(ns, "blue", fabric, type="vxlan")
        subnet(ns, "blue-v4", "blue", "10.0.0.0/24",
               hostRoutes=[{"destination": "192.168.7.0/24", "nexthop": "10.0.0.254"}])  # fmt: skip
        network(ns, "green", fabric, type="vxlan")
        subnet(ns, "green-v4", "green", "10.2.0.0/24")
        router(ns, "r1", ["blue-v4", "green-v4"], external)
        r1 = await ready(kube, Router, "r1", ns)
        assert r1.status.node in (node_name(fabric, n1), node_name(fabric, n2))
        gateway_ip = r1.status.gateway_ip
        assert gateway_ip and gateway_ip.startswith("203.0.113.")
        # The gateway port lives with the external network, not in the project.
        assert not [p for p in await kube.list(Port, ns) if p.spec.device_id == r1.uid
                    and p.spec.device_owner == "network:router_gateway"]  # fmt: skip

        g1, p1, s1 = await guest(kube, fabric, ns, "g1", "blue", n1)
        g2, p2, s2 = await guest(kube, fabric, ns, "g2", "blue", n2)
        g3, p3, s3 = await guest(kube, fabric, ns, "g3", "green", n2)
        servers += [s1, s2, s3]
        lease = dhcp_lease(g1)
        assert lease["router"] == "10.0.0.1"
        assert "192.168.7.0/24 10.0.0.254" in lease["staticroutes"], lease

        # SNAT: the external host sees the router's gateway address.
        assert await answer(g1, UPSTREAM) == ("upstream", gateway_ip)
        assert await answer(g3, UPSTREAM) == ("upstream", gateway_ip)
        # Two subnets of one router reach each other, unNATed.
        assert await answer(g1, ip_of(p3)) == ("g3", ip_of(p1))
        # Without a floating IP nothing reaches a guest from outside, even
        # for an external host that routes the tenant CIDR to the router.
        sh("ip", "-n", upstream, "route", "replace", "10.0.0.0/24", "via", gateway_ip)
        assert ask(upstream, ip_of(p1), timeout=2) is None
        sh("ip", "-n", upstream, "route", "del", "10.0.0.0/24")

        # A floating IP: in and out.
        floating_ip(ns, "fip1", external, "g1")
        fip = await ready(kube, FloatingIP, "fip1", ns)
        address = fip.status.floating_ip_address
        assert address and address != gateway_ip
        assert (fip.status.fixed_ip_address, fip.status.router, fip.status.node) == (
            ip_of(p1),
            "r1",
            r1.status.node,
        )
        assert await answer(upstream, address) == ("g1", UPSTREAM)
        assert await answer(g1, UPSTREAM) == ("upstream", address)
        assert await answer(g2, UPSTREAM) == ("upstream", gateway_ip)

        # Disassociate: no longer reachable. Reassociate to g2: reaches g2.
        kubectl("patch", "floatingip", "fip1", "-n", ns, "--type=json",
                "-p", '[{"op": "remove", "path": "/spec/port"}]')  # fmt: skip

        async def unassociated() -> bool:
            f = await kube.get(FloatingIP, "fip1", ns)
            return f is not None and f.status.is_true("Ready") and f.status.router is None

        await eventually(unassociated, timeout=30, what="fip1 disassociated")

        async def unmapped() -> bool:
            r = await kube.get(Router, "r1", ns)
            return r is not None and r.status.l3 is not None and not r.status.l3.floating_ips

        await eventually(unmapped, timeout=30, what="fip1's NAT removed from r1")
        assert ask(upstream, address, timeout=2) is None
        assert await answer(g1, UPSTREAM) == ("upstream", gateway_ip)
        kubectl("patch", "floatingip", "fip1", "-n", ns, "--type=merge",
                "-p", '{"spec": {"port": "g2"}}')  # fmt: skip
        assert await answer(upstream, address) == ("g2", UPSTREAM)
        fip = await condition(kube, FloatingIP, "fip1", ns)
        assert fip.status.floating_ip_address == address, "the address stays with the FIP"

        # Another project, the same CIDR, its own router to the same outside.
        network(other, "blue", fabric, type="vxlan")
        subnet(other, "blue-v4", "blue", "10.0.0.0/24")
        router(other, "r1", ["blue-v4"], external)
        b1, pb, sb = await guest(kube, fabric, other, "b1", "blue", n1)
        servers.append(sb)
        await ready(kube, Router, "r1", other)
        other_gw = (await kube.get(Router, "r1", other)).status.gateway_ip  # type: ignore[union-attr]
        assert await answer(b1, UPSTREAM) == ("upstream", other_gw)
        for target in (ip_of(p1), ip_of(p2), ip_of(p3)):
            if target != ip_of(pb):
                assert ask(b1, target, timeout=2) is None, f"reached project A's {target}"
        assert not ping(b1, ip_of(p3), count=1)
        for node, p in ((n1, p1), (n2, p2), (n2, p3)):
            plugger(node).unplug(p.uid)
        plugger(n1).unplug(pb.uid)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        for n in (ns, other):
            kubectl(
                "delete", "floatingips,routers,securitygroups", "--all", "-n", n, "--wait=false"
            )
    await routers_removed(kube, fabric, [ns, other])
    for n in (ns, other):
        kubectl("delete", "ports,subnets,networks", "--all", "-n", n, "--wait=false")
    kubectl("delete", "namespace", other, "--wait=false")


async def routers_removed(kube: Kube, fabric: Fabric, namespaces: list[str]) -> None:
    async def clean() -> bool:
        for n in namespaces:
            if await kube.list(Router, n) or await kube.list(FloatingIP, n):
                return False
        if [n for n in fabric.namespaces() if "-qrouter-" in n]:
            return False
        for node in fabric.nodes:
            if [p for p in node.vsctl("list-ports", "br-int").split() if p.startswith("rr")]:
                return False
            links = sh("ip", "-n", node.netns, "-o", "link", "show").stdout
            if " rr" in links:
                return False
        return True

    await eventually(clean, timeout=60, what="router namespaces, veths and OVS ports removed")

    async def released() -> bool:
        held = [
            a.name
            for a in await kube.list(Allocation)
            if a.spec.owner.kind == "FloatingIP"
            or a.spec.owner.name.startswith("rgw-")
            or (a.spec.owner.namespace in namespaces and "-rif-" in a.spec.owner.name)
        ]
        return not held

    await eventually(released, timeout=30, what="router and floating IP addresses released")


def small_fip(ns: str, name: str, ext_ns: str, **spec: Any) -> None:
    body = {"floatingNetwork": {"name": "small", "namespace": ext_ns}, **spec}
    apply({"apiVersion": NET, "kind": "FloatingIP",
           "metadata": {"name": name, "namespace": ns}, "spec": body})  # fmt: skip


async def stalled(kube: Kube, kind: type[Any], name: str, ns: str) -> tuple[str, str]:
    obj = await ready(kube, kind, name, ns, type_="Stalled", timeout=60)
    cond = obj.status.condition("Stalled")
    return cond.reason, cond.message


async def test_bad_input_is_refused_or_stalled(
    kube: Kube,
    controller: Process,
    agents: dict[str, Process],
    fabric: Fabric,
    external: str,
    namespace: str,
) -> None:
    ns, other = namespace, f"tc-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", other)
    try:
        network(ns, "blue", fabric, type="vxlan")
        subnet(ns, "blue-v4", "blue", "10.0.0.0/24", enableDhcp=False)
        network(ns, "twin", fabric, type="vxlan")
        subnet(ns, "twin-v4", "twin", "10.0.0.128/25", enableDhcp=False)
        network(ns, "bare", fabric, type="vxlan")
        subnet(ns, "bare-v4", "bare", "10.9.0.0/24", enableDhcp=False, noGateway=True)
        network(ns, "lone", fabric, type="vxlan")
        subnet(ns, "lone-v4", "lone", "10.8.0.0/24", enableDhcp=False)
        network(other, "only-there", fabric, type="vxlan")
        subnet(other, "theirs-v4", "only-there", "10.7.0.0/24", enableDhcp=False)

        router(ns, "overlap", ["blue-v4", "twin-v4"], None)
        reason, message = await stalled(kube, Router, "overlap", ns)
        assert reason == "SubnetsOverlap" and "10.0.0.128/25" in message, message
        router(ns, "foreign", ["theirs-v4"], None)
        reason, message = await stalled(kube, Router, "foreign", ns)
        assert reason == "SubnetNotFound" and "theirs-v4" in message, message
        router(ns, "nogw", ["bare-v4"], None)
        assert (await stalled(kube, Router, "nogw", ns))[0] == "SubnetHasNoGateway"
        router(ns, "notext", ["lone-v4"], None, externalGateway={"network": {"name": "blue"}})
        assert (await stalled(kube, Router, "notext", ns))[0] == "NetworkNotExternal"
        # Nothing half-built: the refused routers hold no port and no address.
        for name in ("overlap", "foreign", "nogw", "notext"):
            r = await kube.get(Router, name, ns)
            assert r is not None
            assert not [p for p in await kube.list(Port, ns) if p.spec.device_id == r.uid]

        # A floating IP on a subnet with no router to the external network.
        port(ns, "p1", "lone", fixedIps=[{"subnet": "lone-v4"}])
        floating_ip(ns, "nowhere", external, "p1")
        reason, message = await stalled(kube, FloatingIP, "nowhere", ns)
        assert reason == "ExternalGatewayUnreachable" and "lone-v4" in message, message
        # A floating IP from a network that is not external.
        apply({"apiVersion": NET, "kind": "FloatingIP", "metadata": {"name": "inner",
               "namespace": ns}, "spec": {"floatingNetwork": {"name": "blue"}}})  # fmt: skip
        assert (await stalled(kube, FloatingIP, "inner", ns))[0] == "NetworkNotExternal"
        # A tenant port straight on the external network is not allowed.
        apply({"apiVersion": NET, "kind": "Port", "metadata": {"name": "sneak", "namespace": ns},
               "spec": {"network": {"name": "public", "namespace": external}}})  # fmt: skip
        assert (await stalled(kube, Port, "sneak", ns))[0] == "NetworkNotShared"

        # Addresses exhausted: a small external network of two addresses.
        network(external, "small", fabric, type="vlan", physicalNetwork="physnet1",
                segmentationId=3001, external=True)  # fmt: skip
        subnet(external, "small-v4", "small", "198.51.100.0/29", enableDhcp=False,
               allocationPools=[{"start": "198.51.100.2", "end": "198.51.100.3"}])  # fmt: skip
        for name in ("s1", "s2", "s3"):
            small_fip(ns, name, external)
            if name != "s3":
                await ready(kube, FloatingIP, name, ns)
        reason, message = await stalled(kube, FloatingIP, "s3", ns)
        assert reason == "IpAddressExhausted" and "2 of 2" in message, message
        kubectl("delete", "floatingip", "s1", "-n", ns)
        s3 = await ready(kube, FloatingIP, "s3", ns)
        assert s3.status.floating_ip_address in ("198.51.100.2", "198.51.100.3")
        # A requested address that is taken.
        s2 = await kube.get(FloatingIP, "s2", ns)
        assert s2 is not None
        small_fip(ns, "dup", external, floatingIpAddress=s2.status.floating_ip_address)
        assert (await stalled(kube, FloatingIP, "dup", ns))[0] == "IpAddressInUse"
        # Outside the allocation pools is the operator's (upstream hosts):
        # neither a floating address nor a router's gateway address.
        small_fip(ns, "outside", external, floatingIpAddress="198.51.100.5")
        reason, message = await stalled(kube, FloatingIP, "outside", ns)
        assert reason == "IpAddressNotInPool" and "198.51.100.5" in message, message
        small_gw = {"network": {"name": "small", "namespace": external}, "fixedIp": "198.51.100.6"}
        router(ns, "squat", [], None, externalGateway=small_gw)
        reason, message = await stalled(kube, Router, "squat", ns)
        assert reason == "IpAddressNotInPool" and "198.51.100.6" in message, message

        # An interface a floating IP maps through is not detached.
        router(ns, "edge", ["lone-v4"], external)
        await ready(kube, Router, "edge", ns)
        nowhere = await ready(kube, FloatingIP, "nowhere", ns)
        assert nowhere.status.router == "edge"
        router(ns, "edge", [], external)
        reason, message = await stalled(kube, Router, "edge", ns)
        assert reason == "RouterInterfaceInUse" and "nowhere" in message, message
        edge = await kube.get(Router, "edge", ns)
        assert edge is not None and [i.subnet for i in edge.status.interfaces] == ["lone-v4"]
        # The gateway address of a subnet is one router's only.
        router(ns, "second", ["lone-v4"], None)
        reason, message = await stalled(kube, Router, "second", ns)
        assert reason == "IpAddressInUse" and "10.8.0.1" in message, message
        # A port dressed as the interface of a router that does not attach
        # the subnet does not get the gateway address.
        decoy = await kube.get(Router, "squat", ns)
        assert decoy is not None
        owner = {"apiVersion": NET, "kind": "Router", "name": "squat", "uid": decoy.uid}
        fake = {
            "network": {"name": "blue"},
            "deviceOwner": "network:router_interface",
            "deviceId": decoy.uid,
            "fixedIps": [{"ipAddress": "10.0.0.1"}],
        }
        meta = {"name": "fake-rif", "namespace": ns, "ownerReferences": [owner]}
        apply({"apiVersion": NET, "kind": "Port", "metadata": meta, "spec": fake})
        reason, message = await stalled(kube, Port, "fake-rif", ns)
        assert reason == "InvalidIpAddress" and "10.0.0.1" in message, message
    finally:
        for n in (ns, other):
            kubectl(
                "delete", "floatingips,routers,securitygroups", "--all", "-n", n, "--wait=false"
            )
    await routers_removed(kube, fabric, [ns, other])
    for n in (ns, other):
        kubectl("delete", "ports,subnets,networks", "--all", "-n", n, "--wait=false")
    kubectl("delete", "subnet", "small-v4", "-n", external, "--wait=false")
    kubectl("delete", "network", "small", "-n", external, "--wait=false")
    kubectl("delete", "namespace", other, "--wait=false")


async def test_router_moves_when_its_node_dies(
    kube: Kube,
    controller: Process,
    agents: dict[str, Process],
    fabric: Fabric,
    upstream: str,
    external: str,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    ns = namespace
    network(ns, "blue", fabric, type="vxlan")
    subnet(ns, "blue-v4", "blue", "10.0.0.0/24")
    router(ns, "r1", ["blue-v4"], external)
    r1 = await ready(kube, Router, "r1", ns)
    victim = next(n for n in fabric.nodes if node_name(fabric, n) == r1.status.node)
    survivor = next(n for n in fabric.nodes if n is not victim)
    g1, p1, s1 = await guest(kube, fabric, ns, "g1", "blue", survivor)
    try:
        floating_ip(ns, "fip1", external, "g1")
        address = (await ready(kube, FloatingIP, "fip1", ns)).status.floating_ip_address
        assert address
        assert await answer(g1, UPSTREAM) == ("upstream", address)
        assert await answer(upstream, address) == ("g1", UPSTREAM)

        # The router's node dies: its agent stops (its heartbeat is left to
        # expire) and its uplink goes down, so nothing of it forwards.
        uplink = f"ul{fabric.nodes.index(victim) + 1}"
        agents[victim.name].stop()
        sh("ip", "-n", victim.netns, "link", "set", uplink, "down")
        died = time.monotonic()

        async def moved() -> Router | None:
            r = await kube.get(Router, "r1", ns)
            ok = r is not None and r.status.node == node_name(fabric, survivor)
            return r if ok and r.status.is_true("Ready") else None

        moved_router = await eventually(moved, timeout=240, interval=1, what="r1 on the survivor")
        assert moved_router.status.gateway_ip == r1.status.gateway_ip
        assert await answer(g1, UPSTREAM, timeout=60) == ("upstream", address)
        assert await answer(upstream, address, timeout=60) == ("g1", UPSTREAM)
        recovery = time.monotonic() - died
        print(f"\nL3 failover: SNAT and floating IP back after {recovery:.1f} s")

        # The node comes back: its agent removes the router it no longer hosts.
        sh("ip", "-n", victim.netns, "link", "set", uplink, "up")
        agents[victim.name] = l3_agent(fabric, victim, tmp_path_factory)
        prefix = f"{fabric.prefix}{victim.name}-qrouter-"

        async def stale_gone() -> bool:
            return not [n for n in fabric.namespaces() if n.startswith(prefix)]

        await eventually(stale_gone, timeout=60, what="stale router removed from the old node")
        assert await answer(upstream, address) == ("g1", UPSTREAM)
    finally:
        s1.kill()
        s1.wait()
        kubectl("delete", "floatingips,routers,securitygroups", "--all", "-n", ns, "--wait=false")
    await routers_removed(kube, fabric, [ns])
    plugger(survivor).unplug(p1.uid)
    kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false")
