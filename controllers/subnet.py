"""Subnet: effective gateway and pools, overlap checks, usage, safe deletion."""

from __future__ import annotations

from nubes.api.network import Allocation, AllocationPool, Network, Subnet, SubnetStatus
from nubes.controllers.allocations import Ledger
from nubes.controllers.ipam import IpamError, SubnetPlan, overlaps, plan_subnet
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

# Usage counts change with every port; refresh a subnet's at most this often.
USAGE_REFRESH_SECONDS = 5.0


def ip_pool(subnet: Subnet) -> str:
    return f"ip.{subnet.uid}"


def plan_of(subnet: Subnet) -> SubnetPlan:
    spec = subnet.spec
    try:
        return plan_subnet(
            spec.cidr,
            gateway_ip=spec.gateway_ip,
            no_gateway=spec.no_gateway,
            pools=[(p.start, p.end) for p in spec.allocation_pools or []] or None,
        )
    except IpamError as e:
        raise Stall(e.reason, e.message) from e


def network_key(subnet: Subnet) -> str:
    return f"{subnet.namespace}/{subnet.spec.network.name}"


class SubnetReconciler(Reconciler[Subnet]):
    kind = Subnet
    finalizer = "network.nubes.io/subnet"
    workers = 2

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self.ledger = Ledger(op)
        subnets = op.store(Subnet)
        subnets.add_index("uid", lambda s: [s.uid])
        op.watch(
            Network,
            Subnet,
            lambda n: [s.key for s in subnets.by_index("network", n.key)],
            when=lambda old, new: old is None or new is None,
        )
        # A subnet's overlap verdict depends on its siblings.
        op.watch(
            Subnet,
            Subnet,
            lambda s: [x.key for x in subnets.by_index("network", network_key(s))],
            when=lambda old, new: old is None or new is None,
        )

        def usage_changed(old: Allocation | None, new: Allocation | None) -> None:
            alloc = new or old
            if alloc is None or not alloc.spec.pool.startswith("ip."):
                return
            for subnet in subnets.by_index("uid", alloc.spec.pool.removeprefix("ip.")):
                op.enqueue(Subnet, subnet.key, after=USAGE_REFRESH_SECONDS)

        op.store(Allocation).add_listener(usage_changed)

    async def converge(self, obj: Subnet) -> Outcome:
        network = self.op.store(Network).lookup(obj.spec.network.name, obj.namespace)
        if network is None or network.deleting:
            raise Wait("NetworkNotFound", f"network {obj.spec.network.name} does not exist", 5)
        plan = plan_of(obj)
        for other in self.op.store(Subnet).by_index("network", network.key):
            if other.uid == obj.uid or other.deleting:
                continue
            if overlaps(obj.spec.cidr, other.spec.cidr) and _older(other, obj):
                raise Stall(
                    "CidrOverlap",
                    f"{obj.spec.cidr} overlaps {other.spec.cidr} of subnet {other.name} "
                    f"on network {network.name}",
                )
        used = self.ledger.count(ip_pool(obj))
        status = SubnetStatus(
            gateway_ip=str(plan.gateway) if plan.gateway else None,
            allocation_pools=[
                AllocationPool(start=str(plan.address(first)), end=str(plan.address(last)))
                for first, last in plan.pools
            ],
            capacity=plan.capacity,
            used=used,
        )
        return Outcome.ready(status, f"{used} of {plan.capacity} addresses in use")

    async def finalize(self, obj: Subnet) -> Outcome | None:
        holders = self.ledger.store.by_index("pool", ip_pool(obj))
        if holders:
            names = ", ".join(
                sorted(f"{a.spec.owner.namespace}/{a.spec.owner.name}" for a in holders)[:5]
            )
            return Outcome.progressing(
                "InUse",
                f"waiting for {len(holders)} port(s) with addresses here: {names}",
                requeue_after=2,
            )
        return None


def _older(a: Subnet, b: Subnet) -> bool:
    return (a.metadata.creation_timestamp or "", a.name) < (
        b.metadata.creation_timestamp or "",
        b.name,
    )
