"""Security groups and port security on the node (Neutron's iptables hybrid
firewall driver, level-based).

The intent comes from the caches, on the event loop: the ports bound here
with port security on (`status.portSecurityEnabled`, resolved by the
controller with the groups in `status.securityGroups`), the rules of their
groups, and the members (`status.members`, plus what the agent's own Port
cache already shows) of every group a rule names as remote group. A group
that does not exist, is being deleted or is Stalled (unknown remote group,
over the rule quota) contributes no rule: the port fails closed. The
planner (drivers/network/firewall_rules.py) turns that into chains and
ipsets; the driver (drivers/network/firewall.py) writes only what changed,
in transactions.

Two triggers: the networking pass (ports plugged, bound, changed) calls
`converge` before it binds VIFs, so a NIC gets its network only once its
rules are in force; the firewall's own loop follows SecurityGroup changes
(rules, membership) without a full networking pass, which keeps a
membership change to one ipset swap.

Why iptables on qbr and not OVS flows: see the planner's docstring and
docs/security.md.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import structlog

from nubes.agent.config import AgentConfig
from nubes.api.network import Port, SecurityGroup
from nubes.drivers.network.firewall import Firewall
from nubes.drivers.network.firewall_rules import FwPort, FwRule, node_tag, plan_firewall
from nubes.drivers.network.ovs import OvsPort
from nubes.drivers.runner import Runner
from nubes.runtime.operator import Operator

log = structlog.get_logger()


@dataclass
class FirewallIntent:
    """What the node's firewall must be, devices not yet known (pure data)."""

    ports: list[FwPort] = field(default_factory=list)
    """Ports bound here with port security on (device filled in at apply)."""
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Remote group uid -> member addresses."""


def _enforceable(group: SecurityGroup | None) -> bool:
    return group is not None and not group.deleting and not group.status.is_true("Stalled")


def port_intent(port: Port, groups: Mapping[str, SecurityGroup]) -> FwPort:
    """A port's firewall input from its resolved status and its groups
    (`groups` by name, the port's namespace only)."""
    rules: list[FwRule] = []
    for name in port.status.security_groups:
        group = groups.get(name)
        if group is None or not _enforceable(group):
            continue
        for rule in group.spec.rules:
            remote_uid = None
            if rule.remote_group:
                remote = groups.get(rule.remote_group)
                if remote is None or remote.deleting:
                    continue
                remote_uid = remote.uid
            rules.append(
                FwRule(
                    direction=rule.direction,
                    family=4 if rule.ethertype == "IPv4" else 6,
                    protocol=rule.protocol,
                    port_min=rule.port_range_min,
                    port_max=rule.port_range_max,
                    icmp_type=rule.icmp_type,
                    icmp_code=rule.icmp_code,
                    remote_cidr=rule.remote_ip_prefix,
                    remote_group=remote_uid,
                )
            )
    return FwPort(
        uid=port.uid,
        device="",
        mac=(port.status.mac_address or "").lower(),
        ips=tuple(f.ip_address for f in port.status.fixed_ips),
        pairs=tuple(
            (p.ip_address, (p.mac_address or "").lower()) for p in port.spec.allowed_address_pairs
        ),
        rules=tuple(rules),
    )


def filtered(port: Port) -> bool:
    """Port security applies (unknown yet counts as on: fail closed)."""
    return port.status.port_security_enabled is not False


def device_of(ovs_port: OvsPort) -> str | None:
    """The guest side on the port's qbr: the qvo's name with tap for qvo
    (hybrid plug, vif.py); None when the VIF has no qbr to filter on."""
    if ovs_port.name.startswith("qvo"):
        return "tap" + ovs_port.name[3:]
    return None


class NodeFirewall:
    def __init__(self, config: AgentConfig, runner: Runner):
        self.node = config.node
        self.tag = node_tag(config.node)
        self.driver = Firewall(runner, self.tag)
        self._lock = threading.Lock()
        self._vifs: dict[str, OvsPort] | None = None
        self.in_force: set[str] = set()
        """Uids of filtered ports whose rules are in force."""

    def register(self, op: Operator) -> None:
        self.op = op
        groups = op.store(SecurityGroup)
        groups.add_index("fw-namespace", lambda g: [g.namespace or ""])
        op.store(Port).add_index(
            "fw-group", lambda p: [f"{p.namespace}/{g}" for g in p.status.security_groups]
        )
        op.loop("firewall", self.sync, [SecurityGroup])

    # --- intent (event loop) -----------------------------------------------------------

    def intent(self, bound: Mapping[str, Port]) -> FirewallIntent:
        result = FirewallIntent()
        by_namespace: dict[str, dict[str, SecurityGroup]] = {}
        for port in bound.values():
            if port.deleting or not filtered(port):
                continue
            namespace = port.namespace or ""
            if namespace not in by_namespace:
                by_namespace[namespace] = {
                    g.name: g
                    for g in self.op.store(SecurityGroup).by_index("fw-namespace", namespace)
                }
            groups = by_namespace[namespace]
            fw = port_intent(port, groups)
            result.ports.append(fw)
            for rule in fw.rules:
                if rule.remote_group and rule.remote_group not in result.members:
                    remote = next(g for g in groups.values() if g.uid == rule.remote_group)
                    result.members[rule.remote_group] = self.members(remote)
        return result

    def members(self, group: SecurityGroup) -> tuple[str, ...]:
        """The group's members as the controller published them, and as
        this agent's Port cache already shows them: a port joining is in
        force here without waiting for the group's status round trip."""
        cached = {
            f.ip_address
            for p in self.op.store(Port).by_index("fw-group", group.key)
            if not p.deleting
            for f in p.status.fixed_ips
        }
        return tuple(sorted(cached | set(group.status.members)))

    def bound_ports(self) -> dict[str, Port]:
        return {
            p.uid: p
            for p in self.op.store(Port)
            if p.status.host == self.node and p.status.mac_address and not p.deleting
        }

    # --- apply (worker thread) ------------------------------------------------------------

    def converge(
        self, intent: FirewallIntent, vifs: Mapping[str, OvsPort], *, verify: bool = False
    ) -> set[str]:
        """Bring the firewall to `intent` for the VIFs on br-int; returns the
        uids of filtered ports whose rules are in force. A failure leaves the
        previous rules in force (each write is a transaction) and is raised."""
        with self._lock:
            self._vifs = dict(vifs)
            ports = []
            for port in intent.ports:
                vif = vifs.get(port.uid)
                device = device_of(vif) if vif is not None else None
                if device is not None:
                    ports.append(replace(port, device=device))
            plan = plan_firewall(ports, intent.members, self.tag)
            self.driver.apply(plan, verify=verify)
            self.in_force = {p.uid for p in ports}
            return set(self.in_force)

    async def sync(self, full: bool) -> None:
        """SecurityGroup changes: rules and members of the bound ports,
        with the VIFs the last networking pass found."""
        if self._vifs is None:
            return  # the networking pass has not run yet; it converges us
        intent = self.intent(self.bound_ports())
        vifs = self._vifs
        await asyncio.to_thread(self.converge, intent, vifs, verify=full)

    def remove_all(self) -> None:
        with self._lock:
            self.driver.remove_all()
