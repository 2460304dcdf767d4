"""The allocation ledger's counts and membership, which read the cache's
pool index instead of listing a pool, agree with its listing (`used`)."""

from __future__ import annotations

import time
from typing import Any

from nubes.api.meta import ObjectMeta
from nubes.api.network import Allocation, AllocationOwner, AllocationSpec
from nubes.controllers.allocations import Ledger, TakenAddresses, allocation_name
from nubes.runtime.operator import Operator

POOL = "ip/subnet-a"


def allocation(value: str, pool: str = POOL) -> Allocation:
    return Allocation(
        metadata=ObjectMeta(name=allocation_name(pool, value), uid=f"uid-{value}"),
        spec=AllocationSpec(
            pool=pool,
            value=value,
            owner=AllocationOwner(kind="Port", namespace="t", name=f"p-{value}", uid=value),
        ),
    )


def ledger_with(*values: str) -> Ledger:
    ledger = Ledger(Operator("controller", None))  # type: ignore[arg-type]
    for value in values:
        ledger.store.upsert(allocation(value))
    ledger.store.upsert(allocation("10.0.0.9", pool="ip/subnet-b"))
    return ledger


def test_count_and_taken_follow_the_cache_and_this_workers_writes() -> None:
    ledger = ledger_with("10.0.0.2", "10.0.0.3")
    now = time.monotonic()
    # Claimed here, not in the cache yet; released here, still in the cache;
    # learned taken from a conflict; being claimed by another worker.
    ledger._created[allocation_name(POOL, "10.0.0.4")] = (allocation("10.0.0.4"), now)
    ledger._released[allocation_name(POOL, "10.0.0.3")] = now
    ledger._taken[allocation_name(POOL, "10.0.0.5")] = (POOL, "10.0.0.5", now)
    ledger._claiming[allocation_name(POOL, "10.0.0.6")] = (POOL, "10.0.0.6")
    expected = {"10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"}
    assert ledger.used(POOL) == expected
    assert ledger.count(POOL) == len(expected)
    for last in range(2, 10):
        value = f"10.0.0.{last}"
        assert ledger.taken(POOL, value) == (value in expected), value


def test_taken_addresses_answers_for_integers() -> None:
    taken: Any = TakenAddresses(ledger_with("10.0.0.2"), POOL, 4)
    assert 0x0A000002 in taken
    assert 0x0A000003 not in taken
    assert "10.0.0.2" not in taken  # only integers, as the planner asks
