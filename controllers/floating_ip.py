"""FloatingIP: an address of an external subnet, mapped 1:1 to a port.

The address is claimed in the external subnet's IPAM ledger pool with the
FloatingIP as holder (no Port: nothing is plugged for it; the router's
gateway port answers for it), so it counts in the subnet's usage and a
subnet is not deleted under it. The association is checked as Neutron does:
the port's subnet must be an interface of a router of the project whose
gateway is on the floating IP's network. The router's agent applies the NAT
and reports the addresses in force on the Router; the FloatingIP is Ready
once its address is among them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from nubes.api.network import (
    Allocation,
    FloatingIP,
    FloatingIPStatus,
    Network,
    Port,
    Router,
    Subnet,
)
from nubes.controllers.allocations import Ledger, TakenAddresses
from nubes.controllers.indexes import index_floating_ips
from nubes.controllers.router import ready_v4_subnets
from nubes.controllers.subnet import ip_pool, plan_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

IP_ATTEMPTS = 64


def network_ref(fip: FloatingIP) -> tuple[str, str]:
    ref = fip.spec.floating_network
    return ref.namespace or fip.namespace or "", ref.name


class FloatingIPReconciler(Reconciler[FloatingIP]):
    kind = FloatingIP
    finalizer = "network.nubes.io/floatingip"
    workers = 4

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self.ledger = Ledger(op)
        self._uids: dict[str, str] = {}
        fips = op.store(FloatingIP)
        fips.add_index("fip-network", lambda f: ["/".join(network_ref(f))])
        index_floating_ips(op)
        fips.add_index("fip-namespace", lambda f: [f.namespace])
        op.watch(
            Network, FloatingIP, lambda n: [f.key for f in fips.by_index("fip-network", n.key)]
        )
        op.watch(
            Subnet,
            FloatingIP,
            lambda s: [
                f.key for f in fips.by_index("fip-network", f"{s.namespace}/{s.spec.network.name}")
            ],
        )
        op.watch(
            Port,
            FloatingIP,
            lambda p: [f.key for f in fips.by_index("fip-port", p.key)],
            when=lambda old, new: _port_facts(old) != _port_facts(new),
        )
        op.watch(
            Router,
            FloatingIP,
            lambda r: [f.key for f in fips.by_index("fip-namespace", r.namespace)],
        )
        # Exhausted floating IPs retry when an address is given back.
        op.watch(
            Allocation,
            FloatingIP,
            lambda _: [f.key for f in fips if f.status.is_true("Stalled")],
            when=lambda old, new: new is None,
        )

    def _network(self, fip: FloatingIP) -> Network:
        namespace, name = network_ref(fip)
        net: Network | None = self.op.store(Network).lookup(name, namespace)
        if net is None or net.deleting:
            raise Stall(
                "NetworkNotFound", f"floatingNetwork: network {namespace}/{name} does not exist"
            )
        if not net.spec.external:
            raise Stall(
                "NetworkNotExternal",
                f"floatingNetwork: network {namespace}/{name} is not an external network;"
                " floating IPs come from external networks only",
            )
        return net

    async def _address(self, fip: FloatingIP, subnets: list[Subnet]) -> tuple[Subnet, str]:
        by_pool = {ip_pool(s): s for s in subnets}
        for alloc in self.ledger.held(fip.uid, "ip."):
            subnet = by_pool.get(alloc.spec.pool)
            if subnet is not None and fip.spec.floating_ip_address in (None, alloc.spec.value):
                return subnet, alloc.spec.value
        wanted = fip.spec.floating_ip_address
        if wanted is not None:
            address = ipaddress.ip_address(wanted)
            matches = [s for s in subnets if address in ipaddress.ip_network(s.spec.cidr)]
            if not matches:
                raise Stall(
                    "IpAddressNotInSubnet",
                    f"floatingIpAddress: {wanted} is in no subnet of the external network",
                )
            subnet = matches[0]
            plan = plan_of(subnet)
            if not plan.usable(address):
                raise Stall(
                    "InvalidIpAddress",
                    f"floatingIpAddress: {wanted} is the network, broadcast or gateway address"
                    f" of subnet {subnet.name}",
                )
            # The rest of an external subnet is the operator's (upstream
            # routers, hosts): a tenant's router must not answer for it.
            if not plan.in_pool(address):
                raise Stall(
                    "IpAddressNotInPool",
                    f"floatingIpAddress: {wanted} is outside the allocation pools of subnet"
                    f" {subnet.name}",
                )
            if await self.ledger.claim(ip_pool(subnet), str(address), fip):
                return subnet, str(address)
            raise Stall("IpAddressInUse", f"floatingIpAddress: {wanted} is already in use")
        used_total, capacity = 0, 0
        for subnet in subnets:
            plan = plan_of(subnet)
            pool = ip_pool(subnet)
            used_total += self.ledger.count(pool)
            capacity += plan.capacity
            taken = TakenAddresses(self.ledger, pool, plan.network.version)
            for attempt, address in enumerate(plan.free(taken)):
                if attempt >= IP_ATTEMPTS:
                    raise Wait(
                        "IpAllocationContended", "addresses are being taken concurrently", 0.5
                    )
                if await self.ledger.claim(pool, str(address), fip):
                    return subnet, str(address)
        raise Stall(
            "IpAddressExhausted",
            f"the external network has no free address: {used_total} of {capacity} in use",
        )

    def _association(self, fip: FloatingIP, net: Network) -> tuple[Port, str, Router] | None:
        if not fip.spec.port:
            return None
        port: Port | None = self.op.store(Port).lookup(fip.spec.port, fip.namespace)
        if port is None or port.deleting:
            raise Stall("PortNotFound", f"port: port {fip.spec.port} does not exist")
        if not port.status.fixed_ips:
            raise Wait("PortNotReady", f"port {port.name} has no address yet", 5)
        fixed = [
            f for f in port.status.fixed_ips if ipaddress.ip_address(f.ip_address).version == 4
        ]
        if fip.spec.fixed_ip_address:
            fixed = [f for f in fixed if f.ip_address == fip.spec.fixed_ip_address]
            if not fixed:
                raise Stall(
                    "FixedIpNotOnPort",
                    f"fixedIpAddress: {fip.spec.fixed_ip_address} is not an IPv4 address of"
                    f" port {port.name}",
                )
        if not fixed:
            raise Stall("PortHasNoIpv4", f"port: port {port.name} has no IPv4 address")
        chosen = fixed[0]
        for router in sorted(self.op.store(Router), key=lambda r: r.name):
            if router.namespace != fip.namespace or router.deleting:
                continue
            if router.status.external_network_uid != net.uid:
                continue
            address = ipaddress.ip_address(chosen.ip_address)
            if any(address in ipaddress.ip_network(i.cidr) for i in router.status.interfaces):
                return port, chosen.ip_address, router
        raise Stall(
            "ExternalGatewayUnreachable",
            f"port: subnet {chosen.subnet} of port {port.name} is on no router of this project"
            f" with a gateway to external network {net.name}",
        )

    async def converge(self, obj: FloatingIP) -> Outcome:
        self._uids[obj.key] = obj.uid
        net = self._network(obj)
        subnets = ready_v4_subnets(self.op, net)
        if not subnets:
            raise Wait("ExternalSubnetNotReady", f"network {net.name} has no ready IPv4 subnet", 5)
        subnet, address = await self._address(obj, subnets)
        # Unassociated: the association's fields are cleared explicitly.
        status = FloatingIPStatus(
            floating_ip_address=address,
            subnet=subnet.name,
            fixed_ip_address=None,
            port_uid=None,
            router=None,
            node=None,
        )
        try:
            association = self._association(obj, net)
        except (Stall, Wait) as e:
            # The address stays allocated and visible while the association waits.
            if isinstance(e, Wait):
                return Outcome.progressing(e.reason, e.message, status, requeue_after=e.retry_after)
            return Outcome.stalled(e.reason, f"{address}: {e.message}", status)
        if association is None:
            return Outcome.ready(status, f"{address}, not associated")
        port, fixed, router = association
        for other in self.op.store(FloatingIP).by_index("fip-port", port.key):
            if (
                other.uid != obj.uid
                and not other.deleting
                and other.status.fixed_ip_address == fixed
                and _older(other, obj)
            ):
                return Outcome.stalled(
                    "FixedIpAlreadyMapped",
                    f"{address}: {fixed} of port {port.name} is already mapped by floating IP"
                    f" {other.name}",
                    status,
                )
        status = FloatingIPStatus(
            floating_ip_address=address,
            subnet=subnet.name,
            fixed_ip_address=fixed,
            port_uid=port.uid,
            router=router.name,
            node=router.status.node,
        )
        summary = f"{address} -> {fixed} via router {router.name}"
        l3 = router.status.l3
        if (
            router.status.node is None
            or l3 is None
            or l3.node != router.status.node
            or address not in l3.floating_ips
        ):
            return Outcome.progressing(
                "WaitingForRouter", f"{summary}: NAT not yet in force on the router's node", status
            )
        return Outcome.ready(status, f"{summary} on node {router.status.node}")

    async def finalize(self, obj: FloatingIP) -> Outcome | None:
        await self.ledger.release_owner(obj.uid)
        return None

    async def forget(self, key: str) -> None:
        uid = self._uids.pop(key, None)
        if uid is not None:
            await self.ledger.release_owner(uid)


def _older(a: FloatingIP, b: FloatingIP) -> bool:
    return (a.metadata.creation_timestamp or "", a.name) < (
        b.metadata.creation_timestamp or "",
        b.name,
    )


def _port_facts(port: Port | None) -> tuple[Any, ...] | None:
    if port is None:
        return None
    return port.uid, port.deleting, tuple(f.ip_address for f in port.status.fixed_ips)
