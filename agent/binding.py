"""Port binding on the node, as pure decisions (no API, no OVS calls).

A VIF is plugged isolated in the dead VLAN. It gets its network's local VLAN
only once its Port is bound to this node: the controller has put the port's
binding on this node (`status.host`), the port is enabled and not being
deleted, and the network has a local VLAN here. Everything else (unknown
ports, ports bound elsewhere or to nothing, disabled or deleted ports) stays
in, or goes back to, the dead VLAN.

A guest starts only on ports that really carry their network: the Port says
it is bound and active on this node, and the OVS port on br-int is an access
port of that local VLAN (or, for a disabled port, isolated). Both are checked
because either alone can be stale: the status after an agent restart, the
switch after a rebinding elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nubes.api.network import Port
from nubes.drivers.network.ovs import OvsPort
from nubes.drivers.network.switch import DEAD_VLAN, carries, is_isolated


def vif_vlan(port: Port | None, node: str, vlans: Mapping[str, int]) -> int:
    """The tag a plugged VIF must carry: its network's local VLAN once its
    Port is bound here and enabled, the dead VLAN otherwise."""
    if port is None or port.deleting or port.status.host != node:
        return DEAD_VLAN
    if not port.spec.admin_state_up or not port.status.mac_address:
        return DEAD_VLAN
    vlan = vlans.get(port.status.network_uid or "")
    if vlan is None or not 0 < vlan < DEAD_VLAN:
        return DEAD_VLAN
    return vlan


def vif_vlans(
    plugged: Sequence[str], ports: Mapping[str, Port], node: str, vlans: Mapping[str, int]
) -> dict[str, int]:
    """Tag per plugged VIF (by Port uid), for every VIF found on br-int."""
    return {uid: vif_vlan(ports.get(uid), node, vlans) for uid in plugged}


@dataclass(frozen=True)
class Unbound:
    """A port a guest may not run on yet, and why."""

    port: str
    why: str

    def __str__(self) -> str:
        return f"port {self.port} {self.why}"


def unbound_ports(
    ports: Sequence[tuple[str, Port | None]], node: str, vifs: Mapping[str, OvsPort]
) -> list[Unbound]:
    """The ports (name, fresh Port or None when gone) a guest on this node
    may not start with yet; empty when it may start.

    `vifs` are the VIFs on this node's br-int by Port uid."""
    problems = []
    for name, port in ports:
        if port is None or port.deleting:
            problems.append(Unbound(name, "is being deleted"))
            continue
        if port.status.host != node:
            where = f"to node {port.status.host}" if port.status.host else "to no node"
            problems.append(Unbound(name, f"is bound {where}, not {node}"))
            continue
        vif = vifs.get(port.uid)
        if vif is None:
            problems.append(Unbound(name, f"is not plugged on {node}"))
            continue
        if not port.spec.admin_state_up:
            # Disabled by its owner: the guest may run, cut off as Neutron
            # does, but only on an isolated port.
            if not is_isolated(vif):
                problems.append(Unbound(name, "is disabled but not isolated yet"))
            continue
        binding = port.status.binding
        if binding is None or binding.node != node or not binding.active:
            problems.append(Unbound(name, f"is not bound on {node} yet"))
            continue
        if binding.local_vlan is None or not carries(vif, binding.local_vlan):
            problems.append(Unbound(name, f"does not carry its network on {node} yet"))
    return problems
