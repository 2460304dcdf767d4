"""An uninstall's host removal (agent/teardown.py, NodeTeardown.remove_host_state)
on a simulated node with real Open vSwitch, dnsmasq and namespaces: a node
with its switch (tunnel and a provider bridge), a DHCP server and files in
its state and run directories keeps nothing of them afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.agent.config import AgentConfig
from nubes.agent.teardown import NodeTeardown
from nubes.drivers.network.dhcp import DhcpConfig, DhcpServers, DhcpSubnet
from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NetworkSegment, NodeSwitch
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import Fabric

RUN = SubprocessRunner()


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path / "fabric", ["n1", "n2"])
    yield fab
    fab.stop()


def test_remove_host_state_leaves_nothing(fabric: Fabric, tmp_path: Path) -> None:
    n1, n2 = fabric.nodes
    own = set(n1.vsctl("list-br").split())  # the simulated node's uplink bridge
    config = AgentConfig(
        node=f"{fabric.prefix}-n1",
        state_dir=str(tmp_path / "state"),
        run_dir=str(tmp_path / "run"),
        ovs_db=n1.endpoint.db,
        ovs_rundir=str(n1.rundir),
        node_netns=n1.netns,
        netns_prefix=fabric.prefix,
        tunnel_ip=n1.tunnel_ip,
        bridge_mappings={"physnet1": "br-phys"},
        image_store=str(tmp_path / "images"),
    )
    switch = NodeSwitch(
        Ovs(RUN, n1.endpoint),
        datapath_type="netdev",
        tunnel_ip=n1.tunnel_ip,
        bridge_mappings=config.bridge_mappings,
    )
    switch.ensure_base()
    net = NetworkSegment("eeeeeeee-0000-0000-0000-00000000000e", "vxlan", 1005)
    vlan = switch.converge([net], peers=[n2.tunnel_ip])[net.uid]
    servers = DhcpServers(
        RUN,
        Links(RUN),
        switch,
        state_dir=config.state_dir,
        netns_prefix=config.netns_prefix,
        node_netns=n1.netns,
    )
    subnet = DhcpSubnet("10.8.0.0/24", "10.8.0.1", (), ())
    servers.ensure(
        DhcpConfig(net.uid, "dhcp-port", "fa:16:3e:ee:00:02", ("10.8.0.2/24",), vlan, 1450,
                   (subnet,), ())
    )  # fmt: skip
    (tmp_path / "run" / "console").mkdir(parents=True)
    (tmp_path / "run" / "console" / "sock").write_text("")
    (tmp_path / "state" / "_base").mkdir()
    assert set(n1.vsctl("list-br").split()) == own | {"br-int", "br-tun", "br-phys"}
    assert Links.list_netns(f"{fabric.prefix}-dhcp-")
    pid = int((tmp_path / "state" / "dhcp" / net.uid / "pid").read_text())
    assert Path(f"/proc/{pid}").exists()

    removed = NodeTeardown(config).remove_host_state()

    assert set(n1.vsctl("list-br").split()) == own
    assert not Links.list_netns(f"{fabric.prefix}-dhcp-")
    assert not Path(f"/proc/{pid}").exists(), "dnsmasq still runs"
    assert list((tmp_path / "state").iterdir()) == []
    assert list((tmp_path / "run").iterdir()) == []
    assert {"br-int", "br-tun", "br-phys", f"dhcp {net.uid}"} <= set(removed)
    # Nothing left to remove: a retried teardown is harmless.
    assert NodeTeardown(config).remove_host_state() == ["firewall"]
