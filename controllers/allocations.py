"""The allocation ledger: unique values (IPs, MACs, segmentation ids) claimed
as Allocation objects whose names encode pool and value.

Creating an object whose name is taken fails with 409 at the API server, so
two controller workers can never hold the same value; no locks, no leader.
The watch cache tells each worker what is taken; values claimed by this
worker but not yet seen in the cache are remembered locally.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import structlog

from nubes.api.meta import ObjectMeta, Resource
from nubes.api.network import Allocation, AllocationOwner, AllocationSpec
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator

log = structlog.get_logger()

OWNER_LABEL = "nubes.io/owner-uid"
POOL_LABEL = "nubes.io/pool"
# A claim not yet in the watch cache is trusted locally for this long.
PENDING_SECONDS = 30.0


def encode_value(value: str) -> str:
    """A value as a DNS-subdomain-safe name segment."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return value.lower().replace(":", "-").replace("_", "-")
    if address.version == 6:
        return address.exploded.replace(":", "-")
    return str(address).replace(".", "-")


def allocation_name(pool: str, value: str) -> str:
    return f"{pool}.{encode_value(value)}"


def _pool_of(a: Allocation) -> list[str]:
    return [a.spec.pool]


def _owner_of(a: Allocation) -> list[str]:
    return [a.spec.owner.uid]


class TakenAddresses:
    """The addresses of an IP pool that are taken, asked one at a time (as
    integers, what the IPAM planner iterates) instead of listed whole."""

    def __init__(self, ledger: Ledger, pool: str, version: int):
        self.ledger, self.pool, self.version = ledger, pool, version

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        family = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        return self.ledger.taken(self.pool, str(family(value)))


class Ledger:
    """Who holds what: the watch cache, corrected by this worker's own recent
    writes (claims and releases the cache may not show yet), so that a converge
    pass never re-decides on a view older than its own last pass."""

    def __init__(self, op: Operator):
        self.op = op
        self.store = op.store(Allocation)
        self.store.add_index("pool", _pool_of)
        self.store.add_index("owner", _owner_of)
        self._created: dict[str, tuple[Allocation, float]] = {}
        self._released: dict[str, float] = {}
        self._taken: dict[str, tuple[str, str, float]] = {}
        """Names others hold (learned from a 409), by name: (pool, value, when)."""
        self._claiming: dict[str, tuple[str, str]] = {}
        """Claims of this process's workers in flight, by name: (pool, value),
        so that concurrent workers pick different values instead of racing."""

    def _expire(self) -> None:
        now = time.monotonic()
        for name, (alloc, since) in list(self._created.items()):
            seen = self.store.get(name)
            if now - since > PENDING_SECONDS or (seen is not None and seen.uid == alloc.uid):
                del self._created[name]
        for name, since in list(self._released.items()):
            if now - since > PENDING_SECONDS or self.store.get(name) is None:
                del self._released[name]
        for name, (_, _, since) in list(self._taken.items()):
            if now - since > PENDING_SECONDS or self.store.get(name) is not None:
                del self._taken[name]

    def _lookup(self, name: str) -> Allocation | None:
        if name in self._created:
            return self._created[name][0]
        if name in self._released:
            return None
        found: Allocation | None = self.store.get(name)
        return found

    def used(self, pool: str) -> set[str]:
        self._expire()
        values = {
            a.spec.value for a in self.store.by_index("pool", pool) if a.name not in self._released
        }
        values.update(a.spec.value for a, _ in self._created.values() if a.spec.pool == pool)
        values.update(v for p, v, _ in self._taken.values() if p == pool)
        values.update(v for p, v in self._claiming.values() if p == pool)
        return values

    def taken(self, pool: str, value: str) -> bool:
        """Whether `value` of `pool` is held or being claimed: one lookup, so
        that picking a free value does not list a large pool."""
        name = allocation_name(pool, value)
        return self._lookup(name) is not None or name in self._taken or name in self._claiming

    def holder(self, pool: str, value: str) -> Allocation | None:
        return self._lookup(allocation_name(pool, value))

    def held(self, owner_uid: str, pool_prefix: str = "") -> list[Allocation]:
        self._expire()
        found = {
            a.name: a
            for a in self.store.by_index("owner", owner_uid)
            if a.spec.pool.startswith(pool_prefix) and a.name not in self._released
        }
        for name, (alloc, _) in self._created.items():
            if alloc.spec.owner.uid == owner_uid and alloc.spec.pool.startswith(pool_prefix):
                found[name] = alloc
        return list(found.values())

    def count(self, pool: str) -> int:
        """How many values of `pool` are taken (as `used`, without listing it)."""
        self._expire()
        cached = self.store.keys_by_index("pool", pool)
        extra = {name for name, (a, _) in self._created.items() if a.spec.pool == pool}
        extra.update(name for name, (p, _, _) in self._taken.items() if p == pool)
        extra.update(name for name, (p, _) in self._claiming.items() if p == pool)
        gone = sum(1 for name in self._released if name in cached)
        return len(cached) - gone + len(extra - cached)

    async def claim(self, pool: str, value: str, owner: Resource[Any, Any]) -> bool:
        """Take `value` for `owner`; False when someone else holds it."""
        self._expire()
        name = allocation_name(pool, value)
        existing = self._lookup(name)
        if existing is not None:
            return existing.spec.owner.uid == owner.uid
        if name in self._claiming:
            return False  # another worker here is taking it right now
        self._claiming[name] = (pool, value)
        try:
            return await self._create(name, pool, value, owner)
        finally:
            del self._claiming[name]

    async def _create(self, name: str, pool: str, value: str, owner: Resource[Any, Any]) -> bool:
        alloc = Allocation(
            metadata=ObjectMeta(
                name=name,
                labels={OWNER_LABEL: owner.uid, POOL_LABEL: pool[:63].rstrip(".-")},
            ),
            spec=AllocationSpec(
                pool=pool,
                value=value,
                owner=AllocationOwner(
                    kind=owner.crd.kind, namespace=owner.namespace, name=owner.name, uid=owner.uid
                ),
            ),
        )
        try:
            created = Allocation.model_validate(await self.op.kube.create(alloc))
        except ApiError as e:
            if not e.conflict:
                raise
            current = await self.op.kube.get(Allocation, name)
            if current is not None and current.spec.owner.uid == owner.uid:
                self._created[name] = (current, time.monotonic())
                return True
            self._taken[name] = (pool, value, time.monotonic())
            return False
        self._released.pop(name, None)
        self._created[name] = (created, time.monotonic())
        log.debug("claimed", allocation=name, owner=owner.key)
        return True

    async def release(self, alloc: Allocation) -> None:
        log.debug("releasing", allocation=alloc.name, owner=alloc.spec.owner.name)
        await self.op.kube.delete_raw(path_of(Allocation), alloc.name, uid=alloc.uid or None)
        self._created.pop(alloc.name, None)
        self._released[alloc.name] = time.monotonic()

    async def release_owner(self, owner_uid: str, pool_prefix: str = "") -> None:
        for alloc in self.held(owner_uid, pool_prefix):
            await self.release(alloc)
