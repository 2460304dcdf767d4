"""The node's switch layout, after the Neutron Open vSwitch agent.

- br-int: every VIF and DHCP port, as an access port tagged with the
  network's *local* VLAN (per node, 1..4094, unrelated to other nodes' tags);
  plain NORMAL switching. A VIF is plugged isolated and stays so until its
  port is bound here: tag 4095 (the dead VLAN, as Neutron and os-vif use it)
  in trunk mode carrying only VLAN 4095, and a top-priority flow drops every
  frame of VLAN 4095. An access port in VLAN 4095 alone would not do: NORMAL
  switches between access ports of one VLAN, 4095 included, so two unbound
  VIFs could talk; and an untagged OVS port is a trunk of *every* VLAN.
- br-tun: vxlan/gre tunnels to every other node. Traffic from br-int has its
  local VLAN swapped for the network's tunnel id, and back on the way in;
  broadcast floods to all tunnel ports of the type, unicast learns.
- one bridge per provider network (flat/vlan), patched to br-int, translating
  local VLANs to the provider VLAN (or untagged for flat).

The flow tables are pure functions of the networks and ports, replaced as a
whole on every change, so a restarted agent converges to the same state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

import structlog

from nubes.drivers.network.ovs import DatapathType, Ovs, OvsPort

log = structlog.get_logger()

NetworkType = Literal["local", "flat", "vlan", "vxlan", "gre"]
TUNNEL_TYPES: tuple[NetworkType, ...] = ("vxlan", "gre")
VLAN_KEY = "nubes-vlan-"
MADE_KEY = "nubes-made"
"""external_ids key on a provider bridge the agent created (and may remove)."""
IFACE_ID = "iface-id"
DEAD_VLAN = 4095
"""802.1Q reserves VLAN 4095; Neutron's OVS agent and os-vif park unbound
ports there."""
DEAD_PORT: dict[str, str] = {"tag": str(DEAD_VLAN), "vlan_mode": "trunk", "trunks": str(DEAD_VLAN)}
"""Port columns of an isolated VIF: untagged frames from the guest belong to
no VLAN the port carries and are dropped on ingress; frames tagged 4095 meet
the drop flow; nothing of another VLAN is sent to it."""


def is_isolated(port: OvsPort) -> bool:
    return port.tag == DEAD_VLAN and port.vlan_mode == "trunk" and port.trunks == (DEAD_VLAN,)


def carries(port: OvsPort, vlan: int) -> bool:
    """The port is an access port of local VLAN `vlan` (a bound VIF)."""
    return (
        0 < vlan < DEAD_VLAN
        and port.tag == vlan
        and port.vlan_mode in (None, "access")
        and not port.trunks
    )


@dataclass(frozen=True)
class NetworkSegment:
    uid: str
    type: NetworkType
    segmentation_id: int | None = None
    physical_network: str | None = None


class SwitchError(Exception):
    pass


def tunnel_port_name(type_: str, remote_ip: str) -> str:
    """Deterministic, at most 15 characters: vx-/gre- plus the hex address."""
    prefix = "vx" if type_ == "vxlan" else "gre"
    return f"{prefix}-{int(ipaddress.ip_address(remote_ip)):08x}"[:15]


def patch_names(physical_network: str) -> tuple[str, str]:
    """(br-int side, provider side) patch port names."""
    short = physical_network[:10]
    return f"int-{short}", f"phy-{short}"


def allocate_local_vlans(wanted: list[str], existing: dict[str, int]) -> dict[str, int]:
    """Keep the tags networks already have; give new ones the lowest free tag."""
    result = {uid: vlan for uid, vlan in existing.items() if uid in wanted}
    used = set(result.values())
    free = (v for v in range(1, 4095) if v not in used)
    for uid in sorted(wanted):
        if uid not in result:
            try:
                result[uid] = next(free)
            except StopIteration:
                raise SwitchError("no local VLAN left on this node (4094 networks)") from None
    return result


def tunnel_flows(
    networks: list[NetworkSegment],
    local_vlans: dict[str, int],
    patch_ofport: int,
    tunnel_ofports: dict[str, list[int]],
) -> list[str]:
    """br-tun: local VLAN <-> tunnel id, learning unicast, flooding the rest."""
    flows = [
        f"table=0,priority=1,in_port={patch_ofport},actions=resubmit(,2)",
        *(
            f"table=0,priority=1,in_port={ofport},actions=resubmit(,4)"
            for ports in tunnel_ofports.values()
            for ofport in sorted(ports)
        ),
        "table=0,priority=0,actions=drop",
        # Unicast goes to the learned table first, everything else floods.
        "table=2,priority=1,dl_dst=00:00:00:00:00:00/01:00:00:00:00:00,actions=resubmit(,20)",
        "table=2,priority=0,actions=resubmit(,22)",
        "table=4,priority=0,actions=drop",
        (
            "table=10,priority=1,actions=learn(table=20,hard_timeout=300,priority=1,"
            "NXM_OF_VLAN_TCI[0..11],NXM_OF_ETH_DST[]=NXM_OF_ETH_SRC[],load:0->NXM_OF_VLAN_TCI[],"
            "load:NXM_NX_TUN_ID[]->NXM_NX_TUN_ID[],output:OXM_OF_IN_PORT[]),"
            f"output:{patch_ofport}"
        ),
        "table=20,priority=0,actions=resubmit(,22)",
        "table=22,priority=0,actions=drop",
    ]
    for net in sorted(networks, key=lambda n: n.uid):
        if net.type not in TUNNEL_TYPES or net.uid not in local_vlans:
            continue
        vlan, tun = local_vlans[net.uid], net.segmentation_id
        ports = sorted(tunnel_ofports.get(net.type, []))
        flows.append(f"table=4,priority=1,tun_id={tun},actions=mod_vlan_vid:{vlan},resubmit(,10)")
        if ports:
            outputs = ",".join(f"output:{p}" for p in ports)
            flows.append(
                f"table=22,priority=1,dl_vlan={vlan},actions=strip_vlan,set_tunnel:{tun},{outputs}"
            )
    return flows


def integration_flows(
    networks: list[NetworkSegment],
    local_vlans: dict[str, int],
    provider_patch_ofports: dict[str, int],
) -> list[str]:
    """br-int: NORMAL switching; provider traffic gets its local VLAN; the
    dead VLAN goes nowhere."""
    flows = [
        f"table=0,priority=65535,dl_vlan={DEAD_VLAN},actions=drop",
        "table=0,priority=0,actions=NORMAL",
    ]
    for physnet, ofport in sorted(provider_patch_ofports.items()):
        for net in sorted(networks, key=lambda n: n.uid):
            if net.physical_network != physnet or net.uid not in local_vlans:
                continue
            vlan = local_vlans[net.uid]
            if net.type == "vlan":
                match = f"dl_vlan={net.segmentation_id}"
            elif net.type == "flat":
                match = "vlan_tci=0x0000/0x1fff"
            else:
                continue
            flows.append(
                f"table=0,priority=3,in_port={ofport},{match},actions=mod_vlan_vid:{vlan},NORMAL"
            )
        flows.append(f"table=0,priority=2,in_port={ofport},actions=drop")
    return flows


def provider_flows(
    physnet: str,
    networks: list[NetworkSegment],
    local_vlans: dict[str, int],
    patch_ofport: int,
) -> list[str]:
    """Provider bridge: local VLAN out as the provider VLAN (or untagged)."""
    flows = ["table=0,priority=0,actions=NORMAL"]
    for net in sorted(networks, key=lambda n: n.uid):
        if net.physical_network != physnet or net.uid not in local_vlans:
            continue
        vlan = local_vlans[net.uid]
        if net.type == "vlan":
            action = f"mod_vlan_vid:{net.segmentation_id},NORMAL"
        elif net.type == "flat":
            action = "strip_vlan,NORMAL"
        else:
            continue
        flows.append(f"table=0,priority=4,in_port={patch_ofport},dl_vlan={vlan},actions={action}")
    flows.append(f"table=0,priority=2,in_port={patch_ofport},actions=drop")
    return flows


class NodeSwitch:
    """The bridges and flows of one node."""

    def __init__(
        self,
        ovs: Ovs,
        *,
        datapath_type: DatapathType,
        integration_bridge: str = "br-int",
        tunnel_bridge: str = "br-tun",
        tunnel_ip: str | None = None,
        bridge_mappings: dict[str, str] | None = None,
    ):
        self.ovs = ovs
        self.datapath_type = datapath_type
        self.br_int = integration_bridge
        self.br_tun = tunnel_bridge
        self.tunnel_ip = tunnel_ip
        self.bridge_mappings = dict(bridge_mappings or {})

    @property
    def tun_patch(self) -> tuple[str, str]:
        return "patch-tun", "patch-int"

    def ensure_base(self) -> None:
        """Bridges and patch ports; idempotent."""
        self.ovs.ensure_bridge(self.br_int, datapath_type=self.datapath_type)
        if self.tunnel_ip:
            to_tun, to_int = self.tun_patch
            self.ovs.ensure_bridge(self.br_tun, datapath_type=self.datapath_type)
            self.ovs.ensure_port(self.br_int, to_tun, type="patch", options={"peer": to_int})
            self.ovs.ensure_port(self.br_tun, to_int, type="patch", options={"peer": to_tun})
        existing = set(self.ovs.bridges()) if self.bridge_mappings else set()
        for physnet, bridge in self.bridge_mappings.items():
            int_side, phy_side = patch_names(physnet)
            # A provider bridge the operator made (with the uplink in it)
            # outlives the agent; one the agent made is marked as its own.
            made = None if bridge in existing else {MADE_KEY: "true"}
            self.ovs.ensure_bridge(bridge, datapath_type=self.datapath_type, external_ids=made)
            self.ovs.ensure_port(self.br_int, int_side, type="patch", options={"peer": phy_side})
            self.ovs.ensure_port(bridge, phy_side, type="patch", options={"peer": int_side})

    def teardown(self) -> list[str]:
        """Undo ensure_base (an uninstall): the tunnel and integration
        bridges, the provider bridges this switch made, and on a provider
        bridge the operator made only the patch port to br-int. Removing a
        bridge from OVSDB removes its ports and interfaces with it."""
        removed: list[str] = []
        bridges = set(self.ovs.bridges())
        for physnet, bridge in self.bridge_mappings.items():
            if bridge not in bridges:
                continue
            if self.ovs.bridge_external_ids(bridge).get(MADE_KEY) == "true":
                self.ovs.delete_bridge(bridge)
                removed.append(bridge)
            else:
                _, phy_side = patch_names(physnet)
                if phy_side in self.ovs.ports(bridge):
                    self.ovs.delete_port(bridge, phy_side)
                    removed.append(f"{bridge}:{phy_side}")
        for bridge in (self.br_tun, self.br_int):
            if bridge in bridges:
                self.ovs.delete_bridge(bridge)
                removed.append(bridge)
        return removed

    def local_vlans(self) -> dict[str, int]:
        ids = self.ovs.bridge_external_ids(self.br_int)
        return {k.removeprefix(VLAN_KEY): int(v) for k, v in ids.items() if k.startswith(VLAN_KEY)}

    def converge(self, networks: list[NetworkSegment], peers: list[str]) -> dict[str, int]:
        """Make bridges, tunnels and flows match the networks present on this
        node and the other nodes' tunnel endpoints; returns the local VLANs."""
        unsupported = [
            n
            for n in networks
            if n.type in ("flat", "vlan") and n.physical_network not in self.bridge_mappings
        ]
        if unsupported:
            log.warning("no bridge for provider network", networks=[n.uid for n in unsupported])
        # Without a tunnel endpoint, overlay networks still switch locally.
        present = [n for n in networks if n not in unsupported]
        existing = self.local_vlans()
        vlans = allocate_local_vlans([n.uid for n in present], existing)
        changes: dict[str, str | None] = {
            f"{VLAN_KEY}{uid}": None for uid in existing if uid not in vlans
        }
        changes.update(
            {f"{VLAN_KEY}{uid}": str(v) for uid, v in vlans.items() if existing.get(uid) != v}
        )
        self.ovs.set_bridge_external_ids(self.br_int, changes)

        int_ports = self.ovs.ports(self.br_int)
        provider_ofports: dict[str, int] = {}
        for physnet, bridge in self.bridge_mappings.items():
            int_side, phy_side = patch_names(physnet)
            if int_side in int_ports:
                provider_ofports[physnet] = int_ports[int_side].ofport
            phy_ports = self.ovs.ports(bridge)
            if phy_side in phy_ports:
                self.ovs.replace_flows(
                    bridge, provider_flows(physnet, present, vlans, phy_ports[phy_side].ofport)
                )
        self.ovs.replace_flows(self.br_int, integration_flows(present, vlans, provider_ofports))
        if self.tunnel_ip:
            self._converge_tunnels(present, vlans, peers)
        return vlans

    def _converge_tunnels(
        self, networks: list[NetworkSegment], vlans: dict[str, int], peers: list[str]
    ) -> None:
        types = sorted({n.type for n in networks if n.type in TUNNEL_TYPES})
        wanted = {
            tunnel_port_name(t, ip): (t, ip) for t in types for ip in peers if ip != self.tunnel_ip
        }
        ports = self.ovs.ports(self.br_tun)
        for name, port in ports.items():
            if port.type in TUNNEL_TYPES and name not in wanted:
                self.ovs.delete_port(self.br_tun, name)
        for name, (type_, ip) in wanted.items():
            if name not in ports:
                self.ovs.ensure_port(
                    self.br_tun,
                    name,
                    type=type_,
                    options={"remote_ip": ip, "local_ip": str(self.tunnel_ip), "key": "flow"},
                )
        ports = self.ovs.ports(self.br_tun)
        tunnel_ofports: dict[str, list[int]] = {}
        for name, (type_, _) in wanted.items():
            if name in ports and ports[name].ofport > 0:
                tunnel_ofports.setdefault(type_, []).append(ports[name].ofport)
        _, to_int = self.tun_patch
        self.ovs.replace_flows(
            self.br_tun, tunnel_flows(networks, vlans, ports[to_int].ofport, tunnel_ofports)
        )

    # --- ports -----------------------------------------------------------------

    def vif_ports(self) -> dict[str, OvsPort]:
        """br-int ports plugged for Nubes ports, by Port uid."""
        return {
            p.external_ids[IFACE_ID]: p
            for p in self.ovs.ports(self.br_int).values()
            if IFACE_ID in p.external_ids
        }

    def bind(self, port: OvsPort, vlan: int) -> None:
        """Give a VIF its network's local VLAN; DEAD_VLAN isolates it."""
        if vlan == DEAD_VLAN:
            self.isolate(port)
        elif not carries(port, vlan):
            self.ovs.set_port(port.name, {"tag": str(vlan), "vlan_mode": "access"}, ("trunks",))

    def isolate(self, port: OvsPort) -> None:
        if not is_isolated(port):
            self.ovs.set_port(port.name, DEAD_PORT)

    def add_vif(self, device: str, port_uid: str, mac: str, vlan: int | None = None) -> None:
        """Plug a VIF. Without `vlan` (instance and guest NICs) a new port is
        created isolated, in the same OVSDB transaction, and an existing one
        keeps the tag the networking loop gave it, or is isolated if it has
        none; only binding (`bind`) gives it a network. With `vlan` (the
        node's own DHCP ports) it is plugged straight into that VLAN."""
        ids = {IFACE_ID: port_uid, "attached-mac": mac, "iface-status": "active"}
        if vlan is not None:
            self.ovs.ensure_port(self.br_int, device, tag=vlan, external_ids=ids)
            return
        if self.ovs.add_new_port(self.br_int, device, port_settings=DEAD_PORT, external_ids=ids):
            return
        self.ovs.ensure_port(self.br_int, device, external_ids=ids)
        port = self.ovs.ports(self.br_int, (device,)).get(device)
        if port is not None and port.tag is None:
            self.isolate(port)  # untagged: a trunk of every VLAN

    def remove_vif(self, device: str) -> None:
        self.ovs.delete_port(self.br_int, device)
