"""Port: fixed IPs from the ledger, its MAC (controllers/port_mac.py), and
readiness from the agents' reports (DHCP entry in place, plugged on its node).
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple

import structlog

from nubes.api.compute import Instance
from nubes.api.identity import Project
from nubes.api.meta import seconds_since
from nubes.api.network import Allocation, FixedIp, Network, Port, PortStatus, Router, Subnet
from nubes.controllers.allocations import Ledger, TakenAddresses
from nubes.controllers.indexes import index_instances, index_ports, index_projects
from nubes.controllers.ipam import SubnetPlan
from nubes.controllers.network import DHCP_OWNER, ROUTER_INTERFACE
from nubes.controllers.port_mac import MacPicker, holder_of
from nubes.controllers.security_group import ensure_default_group
from nubes.controllers.subnet import ip_pool, plan_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

log = structlog.get_logger()

# Addresses tried per pass before yielding to other ports (another worker may
# be taking the same ones).
IP_ATTEMPTS = 64
# Claims whose holder is gone are released after this grace period.
ORPHAN_GRACE_SECONDS = 30.0


def network_key(port: Port) -> str:
    return f"{port.spec.network.namespace or port.namespace}/{port.spec.network.name}"


class PortReconciler(Reconciler[Port]):
    kind = Port
    workers = 16

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self.ledger = Ledger(op)
        self.macs = MacPicker(op, self.ledger)
        self._cursor: dict[str, int] = {}
        """Per IP pool: where this worker picks next (see _allocate)."""
        self._uids: dict[str, str] = {}
        ports = op.store(Port)
        index_instances(op)
        index_projects(op)

        def ports_on(net_key: str) -> list[str]:
            return [p.key for p in ports.by_index("network", net_key)]

        # Ports care about their network's segment/MTU/DHCP node and about
        # subnets appearing, going or becoming usable; not about usage counts.
        op.watch(
            Network,
            Port,
            lambda n: ports_on(n.key),
            when=lambda old, new: _network_facts(old) != _network_facts(new),
        )
        op.watch(
            Subnet,
            Port,
            lambda s: ports_on(f"{s.namespace}/{s.spec.network.name}"),
            when=lambda old, new: _subnet_facts(old) != _subnet_facts(new),
        )
        # An instance's node is where its ports are bound.
        index_ports(op)
        op.watch(
            Instance,
            Port,
            lambda i: [p.key for p in ports.by_index("device", i.uid)],
            when=lambda old, new: (old and old.status.node) != (new and new.status.node),
        )
        # Stalled ports retry when an address or MAC is given back.
        op.watch(Allocation, Port, self._stalled_ports_of_pool, when=lambda old, new: new is None)
        op.every(60.0, self.release_orphans)

    def _stalled_ports_of_pool(self, alloc: Allocation) -> list[str]:
        kind, _, uid = alloc.spec.pool.partition(".")
        if kind == "ip":
            subnets = self.op.store(Subnet).by_index("uid", uid)
            keys = [f"{s.namespace}/{s.spec.network.name}" for s in subnets]
        elif kind == "mac":
            keys = [n.key for n in self.op.store(Network) if n.uid == uid]
        else:
            return []
        return [
            p.key
            for key in keys
            for p in self.op.store(Port).by_index("network", key)
            if p.status.is_true("Stalled")
        ]

    def accepts(self, obj: Port) -> bool:
        return self.op.owns_shard(obj.uid)

    # --- resolution --------------------------------------------------------------

    def _network(self, port: Port) -> Network:
        ref = port.spec.network
        namespace = ref.namespace or port.namespace
        net: Network | None = self.op.store(Network).lookup(ref.name, namespace)
        if net is None or net.deleting:
            raise Wait("NetworkNotFound", f"network {namespace}/{ref.name} does not exist", 5)
        # External is not enough: other projects reach an external network
        # through router gateways and floating IPs only, never with ports of
        # their own (as in Neutron, unless it is also shared).
        if namespace != port.namespace and not net.spec.shared:
            raise Stall(
                "NetworkNotShared",
                f"network {namespace}/{ref.name} belongs to another project and is not shared",
            )
        return net

    def _subnets(self, net: Network) -> list[Subnet]:
        found = [
            s
            for s in self.op.store(Subnet).by_index("network", net.key)
            if s.status.is_true("Ready") and not s.deleting
        ]
        return sorted(found, key=lambda s: (s.metadata.creation_timestamp or "", s.name))

    # --- fixed IPs ------------------------------------------------------------------------

    def _requests(self, port: Port, subnets: list[Subnet]) -> list[tuple[Subnet, str | None]]:
        by_name = {s.name: s for s in subnets}
        # What the port already has: its claims first (the ledger knows this
        # worker's latest writes), then what its status says.
        sticky = {f.subnet: f.ip_address for f in port.status.fixed_ips}
        pools = {ip_pool(s) for s in subnets}
        guard = self.macs.guard(port, port.status.mac_address, pools)
        for alloc in self.ledger.held(port.uid, "ip."):
            if guard is not None and alloc.name == guard.name:
                continue  # held for the MAC, not for the port's use
            for s in subnets:
                if ip_pool(s) == alloc.spec.pool:
                    sticky[s.name] = alloc.spec.value
        if port.spec.fixed_ips is None:
            wanted: list[tuple[Subnet, str | None]] = []
            for version in (4, 6):
                family = [s for s in subnets if s.spec.ip_version == version]
                kept = [s for s in family if s.name in sticky]
                if kept:
                    wanted.append((kept[0], sticky[kept[0].name]))
                elif family:
                    wanted.append((family[0], None))
            return wanted
        result: list[tuple[Subnet, str | None]] = []
        for request in port.spec.fixed_ips:
            if request.subnet is not None:
                subnet = by_name.get(request.subnet)
                if subnet is None:
                    raise Wait(
                        "SubnetNotFound",
                        f"subnet {request.subnet} is not a ready subnet of network "
                        f"{port.spec.network.name}",
                        5,
                    )
            else:
                assert request.ip_address is not None
                address = ipaddress.ip_address(request.ip_address)
                matches = [s for s in subnets if address in ipaddress.ip_network(s.spec.cidr)]
                if not matches:
                    raise Stall(
                        "IpAddressNotInSubnet",
                        f"{request.ip_address} is in no subnet of network {port.spec.network.name}",
                    )
                subnet = matches[0]
            ip = request.ip_address or sticky.get(subnet.name)
            result.append((subnet, ip))
        return result

    async def _allocate(
        self, port: Port, subnet: Subnet, plan: SubnetPlan, wanted: str | None, explicit: bool
    ) -> str:
        pool = ip_pool(subnet)
        if wanted is not None:
            address = ipaddress.ip_address(wanted)
            if not plan.usable(address) and not self._router_takes_gateway(
                port, subnet, plan, address
            ):
                raise Stall(
                    "InvalidIpAddress",
                    f"{wanted} cannot be assigned on subnet {subnet.name} ({subnet.spec.cidr}):"
                    " it is the network, broadcast or gateway address or outside the CIDR",
                )
            if await self.ledger.claim(pool, str(address), port):
                return str(address)
            if explicit:
                raise Stall(
                    "IpAddressInUse",
                    f"{wanted} is already used by "
                    + holder_of(self.ledger.holder(pool, str(address))),
                )
        # Go on after this worker's last pick in the pool (shards start apart):
        # the addresses before it are most likely taken.
        start = self._cursor.get(pool, self.op.shard * (plan.capacity // max(self.op.shards, 1)))
        taken = TakenAddresses(self.ledger, pool, plan.network.version)
        for attempt, address in enumerate(plan.free(taken, start=start)):
            if attempt >= IP_ATTEMPTS:
                raise Wait(
                    "IpAllocationContended", "addresses are being taken concurrently; retrying", 0.5
                )
            if await self.ledger.claim(pool, str(address), port):
                self._cursor[pool] = plan.index_of(address) + 1
                return str(address)
        raise Stall(
            "IpAddressExhausted",
            f"subnet {subnet.name} ({subnet.spec.cidr}) has no free address: "
            f"{self.ledger.count(pool)} of {plan.capacity} in use",
        )

    def _router_takes_gateway(
        self, port: Port, subnet: Subnet, plan: SubnetPlan, address: Any
    ) -> bool:
        """A router's interface port holds its subnet's gateway address; the
        port must be the router controller's own (a Router with that uid in
        the port's namespace, which is the subnet's, naming the subnet as an
        interface), so no tenant port can take a gateway."""
        if port.spec.device_owner != ROUTER_INTERFACE or address != plan.gateway:
            return False
        if port.spec.network.namespace not in (None, "", port.namespace):
            return False
        router = self.op.store(Router).lookup(_owner_name(port), port.namespace)
        return (
            router is not None
            and router.uid == port.spec.device_id
            and any(i.subnet == subnet.name for i in router.spec.interfaces)
        )

    async def _fixed_ips(self, port: Port, subnets: list[Subnet]) -> list[FixedIp]:
        result = []
        for subnet, wanted in self._requests(port, subnets):
            explicit = (
                any(r.ip_address == wanted for r in port.spec.fixed_ips or [])
                and wanted is not None
            )
            ip = await self._allocate(port, subnet, plan_of(subnet), wanted, explicit)
            result.append(FixedIp(subnet=subnet.name, ip_address=ip))
        return result

    async def _release_other_ips(
        self, port: Port, subnets: list[Subnet], fixed: list[FixedIp], mac: str
    ) -> None:
        keep = {(ip_pool(s), f.ip_address) for s in subnets for f in fixed if f.subnet == s.name}
        guard = self.macs.guard(port, mac, {ip_pool(s) for s in subnets})
        for alloc in self.ledger.held(port.uid, "ip."):
            if (alloc.spec.pool, alloc.spec.value) in keep or (guard and guard.name == alloc.name):
                continue
            await self.ledger.release(alloc)

    # --- converge ------------------------------------------------------------------------------

    async def converge(self, obj: Port) -> Outcome:
        self._uids[obj.key] = obj.uid
        net = self._network(obj)
        subnets = self._subnets(net)
        fixed = await self._fixed_ips(obj, subnets)
        # The MAC before the addresses given up go back: the one its MAC was
        # derived from stays (controllers/port_mac.py).
        mac = await self.macs.mac(obj, net, fixed, subnets)
        await self._release_other_ips(obj, subnets, fixed, mac)
        host = self._host(obj)
        security = security_of(obj, net)
        status = PortStatus(
            mac_address=mac,
            fixed_ips=fixed,
            mtu=net.status.mtu,
            network_uid=net.uid,
            host=host,
            dhcp_node=net.status.dhcp_node,
            port_security_enabled=security.enabled,
            security_groups=security.groups,
        )
        namespace = obj.namespace or ""
        if "default" in security.groups and not self.op.store(Project).by_index(
            "namespace", namespace
        ):
            # A project's reconciler alone makes its default group (a second
            # writer's refused create would still count against its quota);
            # other namespaces get theirs on first use, as in Neutron.
            await ensure_default_group(self.op, namespace)
        addresses = ", ".join(f.ip_address for f in fixed) or "no address"
        if net.status.mtu is None:
            return Outcome.progressing(
                "WaitingForNetwork", f"network {net.name} is not ready", status
            )
        waiting = self._waiting_for(obj, net, subnets, mac, fixed, host)
        if waiting:
            return Outcome.progressing(waiting[0], f"{addresses}; {waiting[1]}", status)
        return Outcome.ready(status, f"{mac} {addresses}")

    def _host(self, port: Port) -> str | None:
        if port.spec.binding.host:
            return port.spec.binding.host
        if port.spec.device_id:
            for inst in self.op.store(Instance).by_index("uid", port.spec.device_id):
                if inst.namespace == port.namespace:
                    node: str | None = inst.status.node
                    return node
        return None

    def _waiting_for(
        self,
        port: Port,
        net: Network,
        subnets: list[Subnet],
        mac: str,
        fixed: list[FixedIp],
        host: str | None,
    ) -> tuple[str, str] | None:
        dhcp_subnets = {s.name for s in subnets if s.spec.enable_dhcp and s.spec.ip_version == 4}
        dhcp_ips = sorted(f.ip_address for f in fixed if f.subnet in dhcp_subnets)
        if dhcp_ips and net.status.dhcp_node and port.spec.device_owner != DHCP_OWNER:
            entry = port.status.dhcp
            if (
                entry is None
                or entry.node != net.status.dhcp_node
                or entry.mac_address != mac
                or sorted(entry.ip_addresses) != dhcp_ips
            ):
                return "WaitingForDhcp", f"DHCP entry not yet served by {net.status.dhcp_node}"
        if host:
            binding = port.status.binding
            if binding is None or binding.node != host or not binding.active:
                return "WaitingForBinding", f"not yet plugged on node {host}"
        return None

    async def forget(self, key: str) -> None:
        uid = self._uids.pop(key, None)
        if uid is not None:
            await self.ledger.release_owner(uid)

    async def release_orphans(self) -> None:
        """Level-based clean-up: claims of ports that no longer exist (missed
        deletions, crashes between claim and status)."""
        live = {p.uid for p in self.op.store(Port)}
        for alloc in list(self.ledger.store):
            owner = alloc.spec.owner
            if owner.kind != "Port" or owner.uid in live or not self.op.owns_shard(owner.uid):
                continue
            age = _age(alloc)
            if age is not None and age > ORPHAN_GRACE_SECONDS:
                log.info("releasing orphaned allocation", allocation=alloc.name)
                await self.ledger.release(alloc)


def _owner_name(port: Port) -> str:
    refs = port.metadata.owner_references or []
    return next((str(r.get("name", "")) for r in refs if r.get("kind") == "Router"), "")


def _age(alloc: Allocation) -> float | None:
    return seconds_since(alloc.metadata.creation_timestamp)


def _network_facts(net: Network | None) -> tuple[Any, ...] | None:
    if net is None:
        return None
    return (
        net.status.mtu,
        net.status.dhcp_node,
        net.uid,
        net.deleting,
        net.spec.port_security_enabled,
    )


class PortSecurity(NamedTuple):
    enabled: bool
    groups: list[str]


def security_of(port: Port, net: Network) -> PortSecurity:
    """Port security and security groups in effect, resolved once here so
    the agents and the SecurityGroup reconciler read one answer: the port's
    setting or its network's; the port's groups, or the project's
    `default`; none at all with port security off (Neutron's rules).
    The network's own ports (DHCP, router) are infrastructure, not guests:
    they are not filtered and belong to no group; such ports live in the
    network's own namespace (another project's port claiming to be one is a
    guest like any other)."""
    enabled = port.spec.port_security_enabled
    if enabled is None:
        enabled = net.spec.port_security_enabled
    if port.spec.device_owner.startswith("network:") and port.namespace == net.namespace:
        enabled = False
    groups = port.spec.security_groups
    if not enabled:
        groups = []
    elif groups is None:
        groups = ["default"]
    return PortSecurity(enabled, sorted(set(groups)))


def _subnet_facts(subnet: Subnet | None) -> tuple[Any, ...] | None:
    if subnet is None:
        return None
    return (subnet.status.is_true("Ready"), subnet.deleting, subnet.spec.enable_dhcp)
