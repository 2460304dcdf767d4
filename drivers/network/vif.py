"""Plugging virtual NICs into the integration bridge (the os-vif part).

Instances use the hybrid plug of Neutron's OVS agent: the tap libvirt creates
joins a per-port Linux bridge (qbr), which a veth (qvb/qvo) joins to br-int.
The Linux bridge is where iptables security groups can see the traffic, and
the veth lets the integration bridge live in another namespace than QEMU.
Namespace guests (tests, or anything that is a netns) get the same qbr hop:
a veth whose far end is the guest's NIC and whose near end, named like the
tap, joins the qbr, so security groups and port security (firewall.py) see
their traffic exactly as an instance's.

A VIF is plugged isolated (NodeSwitch.add_vif): it carries nothing until the
node's networking loop binds it to its network's local VLAN.
"""

from __future__ import annotations

from dataclasses import dataclass

from nubes.drivers.network.netns import Links, one_socket_per_namespace
from nubes.drivers.network.switch import NodeSwitch


@dataclass(frozen=True)
class VifNames:
    tap: str
    qbr: str
    qvb: str
    qvo: str
    guest_peer: str


def vif_names(port_uid: str, node_tag: str = "") -> VifNames:
    """Device names of a port's VIF (at most 15 characters). A node tag in
    the name keeps nodes that share one host namespace (simulated nodes)
    apart; it does no harm on a real node."""
    short = (port_uid.replace("-", "")[: 11 - len(node_tag[:4])] + node_tag[:4])[:11]
    return VifNames(f"tap{short}", f"qbr{short}", f"qvb{short}", f"qvo{short}", f"vg{short}")


class VifPlugger:
    def __init__(
        self, links: Links, switch: NodeSwitch, node_netns: str | None, node_tag: str = ""
    ):
        self.links = links
        self.switch = switch
        self.node_netns = node_netns
        self.node_tag = node_tag

    @one_socket_per_namespace
    def plug_hybrid(self, port_uid: str, mac: str, mtu: int) -> VifNames:
        """qbr + qvb/qvo for an instance NIC; returns the names (libvirt
        plugs `tap` into `qbr`)."""
        names = vif_names(port_uid, self.node_tag)
        self.links.ensure_bridge(names.qbr, mtu=mtu)
        self.links.ensure_veth(names.qvb, None, names.qvo, self.node_netns, mtu=mtu)
        self.links.set_master(names.qvb, names.qbr)
        self.switch.add_vif(names.qvo, port_uid, mac)
        return names

    @one_socket_per_namespace
    def plug_netns(
        self, port_uid: str, mac: str, mtu: int, guest_netns: str, ifname: str = "eth0"
    ) -> VifNames:
        """A namespace guest: `ifname` in `guest_netns` with the port's MAC,
        through qbr like an instance's tap."""
        names = vif_names(port_uid, self.node_tag)
        self.links.ensure_bridge(names.qbr, mtu=mtu)
        self.links.ensure_veth(ifname, guest_netns, names.tap, None, mtu=mtu, mac=mac)
        self.links.set_master(names.tap, names.qbr)
        self.links.ensure_veth(names.qvb, None, names.qvo, self.node_netns, mtu=mtu)
        self.links.set_master(names.qvb, names.qbr)
        self.switch.add_vif(names.qvo, port_uid, mac)
        return names

    @one_socket_per_namespace
    def unplug(self, port_uid: str) -> None:
        names = vif_names(port_uid, self.node_tag)
        self.switch.remove_vif(names.qvo)
        self.switch.remove_vif(names.guest_peer)
        self.links.delete(names.qvb)  # takes qvo with it
        self.links.delete(names.tap)  # a namespace guest's (QEMU's goes with it)
        self.links.delete(names.guest_peer, self.node_netns)
        self.links.delete(names.qbr)
