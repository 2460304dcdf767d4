"""A VIF is plugged isolated and carries its network only once bound, on
real Open vSwitch (userspace datapath) with namespaces as guests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import DEAD_VLAN, NetworkSegment, NodeSwitch, is_isolated
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import Fabric, ping, sh

RUN = SubprocessRunner()
NET = NetworkSegment("eeeeeeee-0000-0000-0000-00000000000e", "local")


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path, ["n1"])
    yield fab
    fab.stop()


def test_unbound_vifs_pass_no_traffic_until_bound(fabric: Fabric) -> None:
    node = fabric.nodes[0]
    switch = NodeSwitch(Ovs(RUN, node.endpoint), datapath_type="netdev")
    switch.ensure_base()
    vlan = switch.converge([NET], peers=[])[NET.uid]
    vif = VifPlugger(Links(RUN), switch, node.netns)

    guests = {}
    for index, name in enumerate(("u1", "u2", "b1"), start=1):
        netns = fabric.guest(name)
        vif.plug_netns(name, f"fa:16:3e:00:0e:0{index}", 1500, netns)
        sh("ip", "-n", netns, "addr", "add", f"10.14.0.{index}/24", "dev", "eth0")
        guests[name] = netns
    # Straight from the plug, before anyone binds anything: isolated.
    plugged = switch.vif_ports()
    for name in guests:
        assert is_isolated(plugged[name]), plugged[name]
    switch.bind(plugged["b1"], vlan)

    u1, u2, b1 = guests["u1"], guests["u2"], guests["b1"]
    # Two unbound VIFs share the dead VLAN but must not reach each other (an
    # access port of VLAN 4095 would: NORMAL switches within any VLAN).
    assert not ping(u1, "10.14.0.2", count=1)
    # Nor the network a bound port is on, either way.
    assert not ping(u1, "10.14.0.3", count=1)
    assert not ping(b1, "10.14.0.1", count=1)

    switch.bind(switch.vif_ports()["u1"], vlan)
    assert ping(u1, "10.14.0.3"), "bound: on its network"
    assert not ping(u1, "10.14.0.2", count=1), "the other one is still unbound"

    # Unbound again (its port deleted or bound elsewhere): isolated at once.
    switch.bind(switch.vif_ports()["u1"], DEAD_VLAN)
    assert is_isolated(switch.vif_ports()["u1"])
    assert not ping(u1, "10.14.0.3", count=1)

    # Re-plugging a bound VIF (every converge does) keeps it bound.
    vif.plug_netns("b1", "fa:16:3e:00:0e:03", 1500, b1)
    assert switch.vif_ports()["b1"].tag == vlan
    # ... and an untagged one (a trunk of every VLAN) is isolated.
    switch.ovs.set_port(plugged["u2"].name, {}, ("tag", "trunks", "vlan_mode"))
    assert switch.vif_ports()["u2"].tag is None
    vif.plug_netns("u2", "fa:16:3e:00:0e:02", 1500, u2)
    assert is_isolated(switch.vif_ports()["u2"])
    # The drop of the dead VLAN is in br-int's table.
    assert f"dl_vlan={DEAD_VLAN} actions=drop" in node.ofctl("dump-flows", "br-int")
    for name in guests:
        vif.unplug(name)
    assert not switch.vif_ports()
