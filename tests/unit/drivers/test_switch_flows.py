"""The node switch's flow tables are pure functions of networks and ports."""

from __future__ import annotations

import pytest

from nubes.drivers.network.dhcp import DhcpConfig, DhcpHost, DhcpSubnet, dnsmasq_args, hosts_file
from nubes.drivers.network.switch import (
    NetworkSegment,
    SwitchError,
    allocate_local_vlans,
    integration_flows,
    provider_flows,
    tunnel_flows,
    tunnel_port_name,
)

VX = NetworkSegment("n-vx", "vxlan", 1001)
GRE = NetworkSegment("n-gre", "gre", 7)
VLAN = NetworkSegment("n-vlan", "vlan", 100, "physnet1")
FLAT = NetworkSegment("n-flat", "flat", None, "physnet1")


def test_local_vlans_are_sticky_and_lowest_free() -> None:
    assert allocate_local_vlans(["a", "b", "c"], {"b": 1}) == {"b": 1, "a": 2, "c": 3}
    assert allocate_local_vlans(["c"], {"b": 1, "c": 7}) == {"c": 7}
    with pytest.raises(SwitchError):
        allocate_local_vlans([str(i) for i in range(4095)], {})


def test_tunnel_flows_translate_and_flood_per_type() -> None:
    flows = tunnel_flows(
        [VX, GRE],
        {"n-vx": 3, "n-gre": 4},
        patch_ofport=1,
        tunnel_ofports={"vxlan": [5, 6], "gre": [7]},
    )
    assert "table=4,priority=1,tun_id=1001,actions=mod_vlan_vid:3,resubmit(,10)" in flows
    assert (
        "table=22,priority=1,dl_vlan=3,actions=strip_vlan,set_tunnel:1001,output:5,output:6"
        in flows
    )
    assert "table=22,priority=1,dl_vlan=4,actions=strip_vlan,set_tunnel:7,output:7" in flows
    assert (
        flows[-1] == "table=22,priority=0,actions=drop"
        or "table=22,priority=0,actions=drop" in flows
    )


def test_provider_flows_tag_and_untag() -> None:
    vlans = {"n-vlan": 2, "n-flat": 3}
    bridge = provider_flows("physnet1", [VLAN, FLAT], vlans, patch_ofport=9)
    assert "table=0,priority=4,in_port=9,dl_vlan=2,actions=mod_vlan_vid:100,NORMAL" in bridge
    assert "table=0,priority=4,in_port=9,dl_vlan=3,actions=strip_vlan,NORMAL" in bridge
    integration = integration_flows([VLAN, FLAT], vlans, {"physnet1": 4})
    assert "table=0,priority=3,in_port=4,dl_vlan=100,actions=mod_vlan_vid:2,NORMAL" in integration
    assert (
        "table=0,priority=3,in_port=4,vlan_tci=0x0000/0x1fff,actions=mod_vlan_vid:3,NORMAL"
        in integration
    )


def test_tunnel_port_names_fit_linux_limits() -> None:
    assert tunnel_port_name("vxlan", "172.31.0.2") == "vx-ac1f0002"
    assert len(tunnel_port_name("gre", "255.255.255.255")) <= 15


def test_dnsmasq_configuration() -> None:
    config = DhcpConfig(
        "net",
        "port",
        "fa:16:3e:00:00:02",
        ("10.0.0.2/24",),
        3,
        1450,
        (
            DhcpSubnet("10.0.0.0/24", "10.0.0.1", ("8.8.8.8",), (("10.9.0.0/16", "10.0.0.9"),)),
            DhcpSubnet("fd00::/64", None),
        ),
        (DhcpHost("fa:16:3e:00:00:05", "10.0.0.5", "host-10-0-0-5"),),
    )
    args = dnsmasq_args(config, "ns-x", {"pid": "p", "hosts": "h", "log": "l"})
    assert "--dhcp-range=set:s0,10.0.0.0,static,255.255.255.0,86400s" in args
    assert "--dhcp-option-force=tag:s0,option:mtu,1450" in args
    assert "--dhcp-option=tag:s0,option:router,10.0.0.1" in args
    assert (
        "--dhcp-option-force=tag:s0,option:classless-static-route,10.9.0.0/16,10.0.0.9,0.0.0.0/0,10.0.0.1"
        in args
    )
    assert not any("fd00" in a for a in args), "IPv6 subnets are IPAM-only"
    assert hosts_file(config.hosts) == "fa:16:3e:00:00:05,host-10-0-0-5,10.0.0.5\n"
