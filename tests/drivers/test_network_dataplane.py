"""The network drivers against real Open vSwitch (userspace datapath), real
dnsmasq and namespaces as guests. Two simulated nodes share a fabric."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.network.dhcp import DhcpConfig, DhcpHost, DhcpServers, DhcpSubnet, names_for
from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NetworkSegment, NodeSwitch
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import Fabric, SimNode, dhcp_lease, ping, sh

RUN = SubprocessRunner()


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path, ["n1", "n2"])
    yield fab
    fab.stop()


def switch_of(node: SimNode, *, tunnels: bool = True) -> NodeSwitch:
    sw = NodeSwitch(
        Ovs(RUN, node.endpoint),
        datapath_type="netdev",
        tunnel_ip=node.tunnel_ip if tunnels else None,
    )
    sw.ensure_base()
    return sw


def guest_with_ip(
    fabric: Fabric,
    node: SimNode,
    vif: VifPlugger,
    name: str,
    port_uid: str,
    mac: str,
    cidr: str,
    vlan: int,
) -> str:
    netns = fabric.guest(name)
    vif.plug_netns(port_uid, mac, 1400, netns)
    vif.switch.bind(vif.switch.vif_ports()[port_uid], vlan)
    sh("ip", "-n", netns, "addr", "add", cidr, "dev", "eth0")
    return netns


def unplug_all(vif: VifPlugger, *port_uids: str) -> None:
    """Unplug and check that no device of the ports is left in the host."""
    for uid in port_uids:
        vif.unplug(uid)
    links = sh("ip", "-br", "link").stdout.split()
    assert not [n for uid in port_uids for n in links if n.startswith(f"qbr{uid}")]


NET_A = NetworkSegment("aaaaaaaa-0000-0000-0000-000000000001", "vxlan", 1001)
NET_B = NetworkSegment("bbbbbbbb-0000-0000-0000-000000000002", "vxlan", 1002)
NET_C = NetworkSegment("00000000-cccc-0000-0000-000000000003", "vxlan", 1003)


def test_vxlan_connects_nodes_and_isolates_networks(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes
    sw1, sw2 = switch_of(n1), switch_of(n2)
    vlans1 = sw1.converge([NET_A, NET_B], peers=[n1.tunnel_ip, n2.tunnel_ip])
    # n2 also hosts C, which sorts first: the same networks get other local tags there.
    vlans2 = sw2.converge([NET_A, NET_B, NET_C], peers=[n1.tunnel_ip, n2.tunnel_ip])
    assert vlans1[NET_A.uid] != vlans2[NET_A.uid]
    vif1 = VifPlugger(Links(RUN), sw1, n1.netns)
    vif2 = VifPlugger(Links(RUN), sw2, n2.netns)
    g1 = guest_with_ip(
        fabric, n1, vif1, "g1", "p1", "fa:16:3e:00:00:01", "10.0.0.1/24", vlans1[NET_A.uid]
    )
    guest_with_ip(
        fabric, n2, vif2, "g2", "p2", "fa:16:3e:00:00:02", "10.0.0.2/24", vlans2[NET_A.uid]
    )
    g3 = guest_with_ip(
        fabric, n2, vif2, "g3", "p3", "fa:16:3e:00:00:03", "10.0.0.3/24", vlans2[NET_B.uid]
    )
    assert ping(g1, "10.0.0.2"), "same vxlan network across nodes must connect"
    assert not ping(g1, "10.0.0.3", count=1), "another vxlan network must be unreachable"
    assert not ping(g3, "10.0.0.1", count=1)
    # Packets really crossed the tunnel with the network's VNI.
    flows = n2.ofctl("dump-flows", "br-tun")
    assert re.search(r"n_packets=[1-9]\d*.*tun_id=0x3e9", flows), flows
    vif1.unplug("p1")
    vif2.unplug("p2")
    vif2.unplug("p3")
    assert not sw1.vif_ports() and not sw2.vif_ports()


def test_identical_cidrs_on_two_networks_stay_apart(fabric: Fabric) -> None:
    n1 = fabric.nodes[0]
    sw = switch_of(n1, tunnels=False)
    x = NetworkSegment("11111111-0000-0000-0000-00000000000x", "local")
    y = NetworkSegment("22222222-0000-0000-0000-00000000000y", "local")
    vlans = sw.converge([x, y], peers=[])
    vif = VifPlugger(Links(RUN), sw, n1.netns)
    g1 = guest_with_ip(
        fabric, n1, vif, "x1", "px1", "fa:16:3e:00:01:01", "10.0.0.1/24", vlans[x.uid]
    )
    guest_with_ip(fabric, n1, vif, "x2", "px2", "fa:16:3e:00:01:02", "10.0.0.2/24", vlans[x.uid])
    g3 = guest_with_ip(
        fabric, n1, vif, "y2", "py2", "fa:16:3e:00:02:02", "10.0.0.2/24", vlans[y.uid]
    )
    assert ping(g1, "10.0.0.2")
    neigh = sh("ip", "-n", g1, "neigh", "show", "10.0.0.2").stdout
    assert "fa:16:3e:00:01:02" in neigh, "must reach the guest of its own network"
    assert not ping(g3, "10.0.0.1", count=1)
    unplug_all(vif, "px1", "px2", "py2")


def _without_counters(flows: str) -> str:
    return re.sub(r"duration=[^,]+,|n_packets=\d+|n_bytes=\d+|idle_age=\d+,?", "", flows)


def test_converge_is_idempotent_and_readopts(fabric: Fabric) -> None:
    n1, n2 = fabric.nodes
    sw = switch_of(n1)
    first = sw.converge([NET_A, NET_B], peers=[n2.tunnel_ip])
    flows_before = n1.ofctl("dump-flows", "br-tun")
    again = switch_of(n1)  # a restarted agent
    assert again.local_vlans() == first
    assert again.converge([NET_A, NET_B], peers=[n2.tunnel_ip]) == first
    assert _without_counters(n1.ofctl("dump-flows", "br-tun")) == _without_counters(flows_before)
    # Removing a network frees its tag and its tunnel flows.
    left = again.converge([NET_B], peers=[n2.tunnel_ip])
    assert NET_A.uid not in left and "tun_id=0x3e9" not in n1.ofctl("dump-flows", "br-tun")
    # No tunnel networks left: no tunnel ports either.
    again.converge([], peers=[n2.tunnel_ip])
    assert "vx-" not in n1.vsctl("list-ports", "br-tun")


def test_dhcp_serves_port_addresses_and_reloads_hosts(fabric: Fabric, tmp_path: Path) -> None:
    n1 = fabric.nodes[0]
    sw = switch_of(n1, tunnels=False)
    net = NetworkSegment("dddddddd-0000-0000-0000-00000000000d", "local")
    vlan = sw.converge([net], peers=[])[net.uid]
    links = Links(RUN)
    vif = VifPlugger(links, sw, n1.netns)
    servers = DhcpServers(
        RUN,
        links,
        sw,
        state_dir=str(tmp_path / "state"),
        netns_prefix=fabric.prefix,
        node_netns=n1.netns,
    )
    subnet = DhcpSubnet(
        "10.9.0.0/24", "10.9.0.1", ("10.9.0.53",), (("192.168.50.0/24", "10.9.0.254"),)
    )
    cfg = DhcpConfig(
        net.uid,
        "dhcp-port",
        "fa:16:3e:dd:00:02",
        ("10.9.0.2/24",),
        vlan,
        1450,
        (subnet,),
        (DhcpHost("fa:16:3e:00:00:11", "10.9.0.11", "vm-one"),),
    )
    servers.ensure(cfg)
    g1 = fabric.guest("d1")
    vif.plug_netns("pd1", "fa:16:3e:00:00:11", 1450, g1)
    sw.bind(sw.vif_ports()["pd1"], vlan)
    lease = dhcp_lease(g1)
    assert lease.get("ip") == "10.9.0.11", lease
    assert lease["router"] == "10.9.0.1"
    assert lease["mtu"] == "1450"
    assert lease["dns"] == "10.9.0.53"
    assert "192.168.50.0/24 10.9.0.254" in lease["staticroutes"]

    pid_before = Path(tmp_path / "state" / "dhcp" / net.uid / "pid").read_text()
    servers.ensure(
        DhcpConfig(
            **{
                **cfg.__dict__,
                "hosts": (*cfg.hosts, DhcpHost("fa:16:3e:00:00:12", "10.9.0.12", "vm-two")),
            }
        )
    )
    assert Path(tmp_path / "state" / "dhcp" / net.uid / "pid").read_text() == pid_before, (
        "a new host entry must not restart dnsmasq"
    )
    g2 = fabric.guest("d2")
    vif.plug_netns("pd2", "fa:16:3e:00:00:12", 1450, g2)
    sw.bind(sw.vif_ports()["pd2"], vlan)
    assert dhcp_lease(g2).get("ip") == "10.9.0.12"
    assert ping(g2, "10.9.0.11")

    # An unknown MAC gets nothing: addresses come only from ports.
    g3 = fabric.guest("d3")
    vif.plug_netns("pd3", "fa:16:3e:00:00:13", 1450, g3)
    sw.bind(sw.vif_ports()["pd3"], vlan)
    assert dhcp_lease(g3, timeout=3) == {}

    # A port deleted and its address given to a new port (another MAC): the
    # old lease is released, so the new port gets the address at once.
    servers.ensure(
        DhcpConfig(
            **{
                **cfg.__dict__,
                "hosts": (
                    DhcpHost("fa:16:3e:00:00:12", "10.9.0.12", "vm-two"),
                    DhcpHost("fa:16:3e:00:00:13", "10.9.0.11", "vm-three"),
                ),
            }
        )
    )
    assert dhcp_lease(g3).get("ip") == "10.9.0.11"

    netns, _, outer = names_for(net.uid, fabric.prefix)
    pid = int(pid_before)
    servers.remove(net.uid)
    assert not os.path.exists(f"/proc/{pid}")
    assert not Links.netns_exists(netns)
    assert outer not in n1.vsctl("list-ports", "br-int")
    assert servers.networks() == set()
    unplug_all(vif, "pd1", "pd2", "pd3")


def test_teardown_removes_only_what_the_switch_made(fabric: Fabric) -> None:
    """An uninstall's teardown (agent/teardown.py): br-int, br-tun and the
    provider bridge the agent created go; the operator's own provider bridge
    stays, without the agent's patch port."""
    n1, n2 = fabric.nodes
    own = set(n1.vsctl("list-br").split())  # the simulated node's uplink bridge
    n1.vsctl("add-br", "br-ops", "--", "set", "bridge", "br-ops", "datapath_type=netdev")
    sw = NodeSwitch(
        Ovs(RUN, n1.endpoint),
        datapath_type="netdev",
        tunnel_ip=n1.tunnel_ip,
        bridge_mappings={"physnet1": "br-ops", "physnet2": "br-made"},
    )
    sw.ensure_base()
    sw.converge([NET_A], peers=[n2.tunnel_ip])
    assert set(n1.vsctl("list-br").split()) == own | {"br-int", "br-tun", "br-ops", "br-made"}
    removed = sw.teardown()
    assert set(n1.vsctl("list-br").split()) == own | {"br-ops"}
    assert n1.vsctl("list-ports", "br-ops").split() == []
    assert {"br-int", "br-tun", "br-made"} <= set(removed)
    assert sw.teardown() == []  # idempotent: nothing of it is left
