"""Security groups and port security end to end (Tempest's
security_groups_basic_ops, with two projects): the controller, two node
agents on simulated nodes (their own OVS, vxlan between them), the real
iptables/ebtables/ipset of this machine, and namespace guests plugged
through a qbr exactly as instances are.

Every "cannot" below has a positive control that shows the same probe
succeeding where the defence is off or the rule allows it, so no check
passes because the probe itself is broken.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nubes.api.identity import Project
from nubes.api.network import Port, SecurityGroup
from nubes.drivers.network.firewall_rules import eui64_link_local, node_tag
from nubes.runtime.kube import Kube
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

CIDR = "10.70.0"


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["n1", "n2"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agents(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Process]]:
    procs = {n.name: start_agent(fabric, n, tmp_path_factory) for n in fabric.nodes}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        for node in fabric.nodes:
            kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")
    for proc in procs.values():
        proc.assert_no_crash()


@dataclass
class Guest:
    name: str
    ns: str
    netns: str
    node: SimNode
    port: Port

    @property
    def ip(self) -> str:
        return self.port.status.fixed_ips[0].ip_address

    @property
    def mac(self) -> str:
        return self.port.status.mac_address or ""


@dataclass
class World:
    kube: Kube
    fabric: Fabric
    a: str
    b: str
    guests: dict[str, Guest]
    next_ip: list[int]

    async def guest(
        self, name: str, ns: str, node: SimNode, net: str = "shared", **spec: Any
    ) -> Guest:
        """A port with the next free address, and a namespace guest on it."""
        self.next_ip[0] += 1
        ip = f"{CIDR}.{self.next_ip[0]}"
        if ns == self.b and net == "shared":
            spec["network"] = {"name": "shared", "namespace": self.a}
        port(ns, name, net, node_name(self.fabric, node), fixedIps=[{"ipAddress": ip}], **spec)
        p = await condition(self.kube, Port, name, ns, type_="Reconciling", timeout=60)
        netns = self.fabric.guest(f"{name}{uuid.uuid4().hex[:3]}")
        # pyroute2 (the drivers' netlink) must not run on the event loop's thread.
        await asyncio.to_thread(
            plugger(node).plug_netns,
            p.uid,
            p.status.mac_address or "",
            p.status.mtu or 1500,
            netns,
        )
        sh("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        p = await condition(self.kube, Port, name, ns, timeout=60)
        g = Guest(name, ns, netns, node, p)
        self.guests[name] = g
        return g


def project(name: str) -> None:
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": name},
            "spec": {"description": "security group tests"},
        }
    )


def group(ns: str, name: str, rules: list[dict[str, Any]]) -> None:
    apply(
        {
            "apiVersion": NET,
            "kind": "SecurityGroup",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"rules": rules},
        }
    )


@pytest.fixture(scope="module")
async def world(
    kube: Kube, controller: Process, agents: dict[str, Process], fabric: Fabric
) -> AsyncIterator[World]:
    suffix = uuid.uuid4().hex[:5]
    a, b = f"sga-{suffix}", f"sgb-{suffix}"
    for name in (a, b):
        project(name)
    for name in (a, b):
        await condition(kube, Project, name, None, timeout=90)
    w = World(kube, fabric, a, b, {}, [10])
    network(a, "shared", fabric, type="vxlan", shared=True)
    subnet(a, "shared-v4", "shared", f"{CIDR}.0/24", enableDhcp=False)
    try:
        yield w
    finally:
        for g in w.guests.values():
            await asyncio.to_thread(plugger(g.node).unplug, g.port.uid)
        for ns in (b, a):
            kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false")
        await _ports_gone(kube, [a, b])
        for name in (a, b):
            kubectl("delete", "project", name, "--wait=false", check=False)
        await _firewall_gone(fabric)


async def _ports_gone(kube: Kube, namespaces: list[str]) -> None:
    async def gone() -> bool:
        for ns in namespaces:
            if await kube.list(Port, ns):
                return False
        return True

    await eventually(gone, timeout=120, what="ports deleted")


def _own_lines(fabric: Fabric) -> list[str]:
    """Everything of the test agents' firewalls left in the host namespace."""
    prefixes = [f"nb-{node_tag(node_name(fabric, n))}-" for n in fabric.nodes]
    out = []
    for argv in (["iptables-save"], ["ip6tables-save"], ["ebtables-save"], ["ipset", "list", "-n"]):
        text = sh(*argv).stdout
        out += [
            f"{argv[0]}: {line}" for line in text.splitlines() if any(p in line for p in prefixes)
        ]
    return out


async def _firewall_gone(fabric: Fabric) -> None:
    await eventually(
        lambda: not _own_lines(fabric), timeout=60, what="no chain, rule or ipset left"
    )


# --- probes -------------------------------------------------------------------------------

UDP_LISTEN = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(float(sys.argv[2]))
    try:
        while True:
            data, peer = s.recvfrom(100)
            print(peer[0], flush=True)
    except socket.timeout:
        pass
    """
)
UDP_SEND = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 0))
    for _ in range(5):
        s.sendto(b"x", (sys.argv[2], int(sys.argv[3])))
        time.sleep(0.1)
    """
)


# An unsolicited IPv6 neighbour advertisement (override flag set) from the
# sender's own link-local address, saying `target` is at `mac`.
NA_SEND = textwrap.dedent(
    """
    import socket, struct, sys, time
    source, target, to, mac = sys.argv[1:5]
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    index = socket.if_nametoindex("eth0")
    for _ in range(50):  # until duplicate address detection is over
        try:
            s.bind((source, 0, 0, index))
            break
        except OSError:
            time.sleep(0.1)
    option = bytes([2, 1]) + bytes.fromhex(mac.replace(":", ""))
    na = struct.pack("!BBHI", 136, 0, 0, 0x20000000)
    na += socket.inet_pton(socket.AF_INET6, target) + option
    for _ in range(3):
        s.sendto(na, (to, 0, 0, index))
        time.sleep(0.2)
    """
)


def advertise(sender: Guest, target: str, to: Guest) -> None:
    """`sender` tells `to` that `target` is at the sender's MAC."""
    sh(
        "ip", "netns", "exec", sender.netns, sys.executable, "-c", NA_SEND,
        eui64_link_local(sender.mac), target, eui64_link_local(to.mac), sender.mac,
    )  # fmt: skip


def neighbour(guest: Guest, address: str) -> str:
    return sh("ip", "-n", guest.netns, "neigh", "show", address, "dev", "eth0").stdout


def udp_received(sender: Guest, source: str, receiver: Guest, *, port: int = 9999) -> list[str]:
    """Sources of the UDP datagrams `receiver` got from `sender` sending
    from `source` (which the sender carries as an address)."""
    listen = subprocess.Popen(
        ["ip", "netns", "exec", receiver.netns, sys.executable, "-c", UDP_LISTEN, str(port), "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    # The receiver's MAC is known: an ARP request from a spoofed address
    # would be dropped on its own and hide whether the IP packet passes.
    sh(
        "ip",
        "-n",
        sender.netns,
        "neigh",
        "replace",
        receiver.ip,
        "lladdr",
        receiver.mac,
        "dev",
        "eth0",
    )
    sh(
        "ip",
        "netns",
        "exec",
        sender.netns,
        sys.executable,
        "-c",
        UDP_SEND,
        source,
        receiver.ip,
        str(port),
    )
    out, _ = listen.communicate(timeout=15)
    return out.split()


def tcp_open(client: Guest, server: Guest, port: int) -> bool:
    """Whether `client` connects to a listener on `server`:`port`."""
    listener = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            server.netns,
            "busybox",
            "timeout",
            "8",
            "busybox",
            "nc",
            "-l",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", client.netns, "busybox", "timeout", "5",
             "busybox", "nc", "-w", "3", server.ip, str(port)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False,
        )  # fmt: skip
        return result.returncode == 0
    finally:
        listener.kill()
        listener.wait()


# --- tests --------------------------------------------------------------------------------


async def test_default_group_reaches_own_project_only(world: World) -> None:
    n1, n2 = world.fabric.nodes
    a1 = await world.guest("a1", world.a, n1)
    a2 = await world.guest("a2", world.a, n2)
    b1 = await world.guest("b1", world.b, n1)
    for ns in (world.a, world.b):
        sg = await condition(world.kube, SecurityGroup, "default", ns)
        assert [r.remote_group for r in sg.spec.rules if r.direction == "ingress"] == [
            "default",
            "default",
        ]
    # Members of A's default on the other node: through the ipset.
    await eventually(lambda: ping(a1.netns, a2.ip), timeout=20, what="a1 reaches a2")
    assert ping(a2.netns, a1.ip)
    # The other project's guest on the same shared network: not a member.
    assert not ping(b1.netns, a1.ip, count=1)
    assert not ping(a1.netns, b1.ip, count=1)
    sg = await world.kube.get(SecurityGroup, "default", world.a)
    assert sg is not None and {a1.ip, a2.ip} <= set(sg.status.members)
    assert b1.ip not in sg.status.members


async def test_cidr_rules_apply_and_go_on_running_guests(world: World) -> None:
    n1, n2 = world.fabric.nodes
    group(
        world.a,
        "web",
        [
            {"direction": "ingress", "protocol": "icmp", "remoteIpPrefix": f"{CIDR}.0/24"},
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22,
             "remoteIpPrefix": f"{CIDR}.0/24"},
            {"direction": "egress"},
        ],
    )  # fmt: skip
    await condition(world.kube, SecurityGroup, "web", world.a)
    web = await world.guest("web1", world.a, n2, securityGroups=["web"])
    # Port security off, no groups: open (the stateful probe's peer).
    open_ = await world.guest("open1", world.a, n1, portSecurityEnabled=False)
    b1 = world.guests.get("b1") or await world.guest("b1", world.b, n1)
    assert ping(b1.netns, web.ip), "icmp from the CIDR is allowed"
    assert tcp_open(b1, web, 22), "tcp/22 from the CIDR is allowed"
    assert not tcp_open(b1, web, 23), "tcp/23 is not"
    assert tcp_open(web, open_, 23), "control: the probe works where nothing filters"
    # Removing the ICMP rule closes it for the running guest.
    kubectl(
        "patch", "securitygroup", "web", "-n", world.a, "--type=json",
        "-p", '[{"op": "remove", "path": "/spec/rules/0"}]',
    )  # fmt: skip
    await eventually(lambda: not ping(b1.netns, web.ip, count=1), timeout=20, what="icmp closed")
    assert tcp_open(b1, web, 22), "the other rule stays"
    # Stateful: the guest's own pings get their replies although no
    # ingress rule allows ICMP any more; the peer cannot ping it.
    assert ping(web.netns, open_.ip)
    assert not ping(open_.netns, web.ip, count=1)


async def test_remote_group_follows_membership_on_the_other_node(world: World) -> None:
    n1, n2 = world.fabric.nodes
    group(world.a, "app", [{"direction": "egress"}])
    group(world.a, "db", [{"direction": "ingress", "protocol": "icmp", "remoteGroup": "app"}])
    db = await world.guest("db1", world.a, n1, securityGroups=["db"])
    app = await world.guest("app1", world.a, n2, securityGroups=["web"])
    assert not ping(app.netns, db.ip, count=1), "not a member of app yet"
    kubectl(
        "patch", "port", "app1", "-n", world.a, "--type=merge",
        "-p", '{"spec": {"securityGroups": ["web", "app"]}}',
    )  # fmt: skip
    await eventually(lambda: ping(app.netns, db.ip, count=1), timeout=20, what="member reaches db")
    sg = await world.kube.get(SecurityGroup, "app", world.a)
    assert sg is not None and app.ip in sg.status.members
    # A rule naming a group that does not exist: Stalled with a reason.
    group(world.a, "broken", [{"direction": "ingress", "remoteGroup": "nope"}])
    bad = await condition(world.kube, SecurityGroup, "broken", world.a, type_="Stalled")
    assert bad.status.condition("Stalled").reason == "RemoteGroupNotFound"


async def test_spoofing_reaches_and_poisons_nobody(world: World) -> None:
    n1, n2 = world.fabric.nodes
    a1 = world.guests.get("a1") or await world.guest("a1", world.a, n1)
    a2 = world.guests.get("a2") or await world.guest("a2", world.a, n2)
    # Attackers of project B on A's shared network, one with port security
    # off as the control.
    evil = await world.guest("evil", world.b, n1)
    ctrl = await world.guest("ctrl", world.b, n2, portSecurityEnabled=False)
    for g in (evil, ctrl):
        # They carry a2's address but never answer ARP for it (that would be
        # another attack, and the control would win it).
        sh("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=8", netns=g.netns)
        sh("ip", "-n", g.netns, "addr", "add", f"{a2.ip}/32", "dev", "eth0")

    # Another guest's IP as source: a1 lets a2's address in (default group).
    assert a2.ip in udp_received(ctrl, a2.ip, a1), "control: spoofed source delivered"
    assert not udp_received(evil, a2.ip, a1), "spoofed IP must be dropped"
    # Another guest's MAC and IP.
    sh("ip", "-n", evil.netns, "link", "set", "eth0", "address", a2.mac)
    assert not udp_received(evil, a2.ip, a1), "spoofed MAC and IP must be dropped"
    sh("ip", "-n", evil.netns, "link", "set", "eth0", "address", evil.mac)

    # Gratuitous ARP for a2's address: a1's neighbour entry keeps a2's MAC.
    assert ping(a1.netns, a2.ip)
    garp = ("busybox", "arping", "-U", "-c", "2", "-I", "eth0", "-s", a2.ip, a2.ip)
    sh(*garp, netns=evil.netns, check=False)
    time.sleep(1)
    assert a2.mac in sh("ip", "-n", a1.netns, "neigh", "show", a2.ip).stdout, "poisoned"
    sh(*garp, netns=ctrl.netns, check=False)
    await eventually(
        lambda: ctrl.mac in sh("ip", "-n", a1.netns, "neigh", "show", a2.ip).stdout,
        timeout=5,
        what="control: gratuitous ARP poisons without port security",
    )
    sh("ip", "-n", a1.netns, "neigh", "flush", a2.ip)

    # The same in IPv6: a neighbour advertisement for a2's (link-local)
    # address. a2's own advertisement for it passes; a1 keeps a2's MAC.
    a2_ll = eui64_link_local(a2.mac)
    sh("busybox", "ping", "-6", "-c", "1", "-w", "2", f"{a2_ll}%eth0", netns=a1.netns, check=False)
    await eventually(
        lambda: a2.mac in neighbour(a1, a2_ll), timeout=5, what="a2 resolved over IPv6"
    )
    advertise(evil, a2_ll, a1)
    time.sleep(1)
    assert a2.mac in neighbour(a1, a2_ll), "poisoned by a neighbour advertisement"
    advertise(ctrl, a2_ll, a1)
    await eventually(
        lambda: ctrl.mac in neighbour(a1, a2_ll),
        timeout=5,
        what="control: a neighbour advertisement poisons without port security",
    )

    # A DHCP server: the victim gets no lease from it; from the control it does.
    victim = await world.guest("victim", world.a, n2)
    sh("ip", "-n", victim.netns, "addr", "flush", "dev", "eth0")
    for server in (evil, ctrl):
        sh("ip", "-n", server.netns, "addr", "del", f"{a2.ip}/32", "dev", "eth0")
    conf = Path(f"/tmp/{world.fabric.prefix}-udhcpd.conf")
    leases = Path(f"/tmp/{world.fabric.prefix}-udhcpd.leases")
    conf.write_text(
        f"start {CIDR}.200\nend {CIDR}.210\ninterface eth0\noption subnet 255.255.255.0\n"
        f"lease_file {leases}\n"
    )
    try:
        for server, expect in ((evil, False), (ctrl, True)):
            leases.write_text("")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", server.netns, "busybox", "udhcpd", "-f", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(0.5)
                lease = dhcp_lease(victim.netns, timeout=6)
                sh("ip", "-n", victim.netns, "addr", "flush", "dev", "eth0")
            finally:
                proc.kill()
                proc.wait()
            assert bool(lease.get("ip", "").startswith(f"{CIDR}.2")) == expect, (server.name, lease)
    finally:
        conf.unlink(missing_ok=True)
        leases.unlink(missing_ok=True)


async def test_allowed_address_pairs(world: World) -> None:
    n1, n2 = world.fabric.nodes
    open_ = world.guests.get("open1") or await world.guest(
        "open1", world.a, n1, portSecurityEnabled=False
    )
    vip = f"{CIDR}.250"
    pair = await world.guest("pair1", world.a, n2)
    sh("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=8", netns=pair.netns)
    sh("ip", "-n", pair.netns, "addr", "add", f"{vip}/32", "dev", "eth0")
    assert vip not in udp_received(pair, vip, open_), "an extra address needs a pair"
    kubectl(
        "patch", "port", "pair1", "-n", world.a, "--type=merge",
        "-p", f'{{"spec": {{"allowedAddressPairs": [{{"ipAddress": "{vip}"}}]}}}}',
    )  # fmt: skip

    async def delivered() -> bool:
        return vip in udp_received(pair, vip, open_)

    await eventually(delivered, timeout=20, what="the pair's address works")


async def test_agent_restart_keeps_rules_in_force(
    world: World, agents: dict[str, Process], tmp_path_factory: pytest.TempPathFactory
) -> None:
    n1, n2 = world.fabric.nodes
    a1 = world.guests.get("a1") or await world.guest("a1", world.a, n1)
    a2 = world.guests.get("a2") or await world.guest("a2", world.a, n2)
    b1 = world.guests.get("b1") or await world.guest("b1", world.b, n1)
    # Forbidden traffic (b1 -> a1) and allowed traffic (a2 -> a1) all along
    # the restart of a1's agent: not one forbidden echo is answered.
    forbidden = subprocess.Popen(
        ["ip", "netns", "exec", b1.netns, "busybox", "ping", "-i", "0.2", "-c", "60", a1.ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    allowed = subprocess.Popen(
        ["ip", "netns", "exec", a2.netns, "busybox", "ping", "-i", "0.2", "-c", "60", a1.ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    agents[n1.name].stop()
    agents[n1.name] = start_agent(world.fabric, n1, tmp_path_factory)
    out, _ = forbidden.communicate(timeout=60)
    ok, _ = allowed.communicate(timeout=60)
    assert " 0 packets received" in out, out
    assert "bytes from" in ok, ok
    assert ping(a2.netns, a1.ip) and not ping(b1.netns, a1.ip, count=1)


async def test_rule_quota_counts_every_group_of_the_project(world: World) -> None:
    # Project A holds default (4 rules) and the groups of the tests above;
    # a limit just above that leaves room for 2 more rules.
    groups = [g async for g in _groups(world.kube, world.a)]
    used = sum(len(g.spec.rules) for g in groups)
    kubectl(
        "patch", "project", world.a, "--type=merge",
        "-p", f'{{"spec": {{"quotas": {{"securityGroupRules": {used + 2}}}}}}}',
    )  # fmt: skip
    rules = [{"direction": "ingress", "protocol": "tcp", "portRangeMin": p, "portRangeMax": p}
             for p in (80, 443, 8080)]  # fmt: skip
    group(world.a, "big", rules)
    big = await condition(world.kube, SecurityGroup, "big", world.a, type_="Stalled")
    cond = big.status.condition("Stalled")
    assert cond.reason == "QuotaExceeded", cond
    assert cond.message == f"securityGroupRules: {used} of {used + 2} in use, this group needs 3"
    group(world.a, "small", rules[:2])
    await condition(world.kube, SecurityGroup, "small", world.a)
    kubectl(
        "patch", "project", world.a, "--type=merge",
        "-p", '{"spec": {"quotas": {"securityGroupRules": -1}}}',
    )  # fmt: skip
    await condition(world.kube, SecurityGroup, "big", world.a)


async def _groups(kube: Kube, ns: str) -> AsyncIterator[SecurityGroup]:
    for g in await kube.list(SecurityGroup, ns):
        yield g
