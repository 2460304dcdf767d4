"""Choosing a storage pool for a new volume (pure), after cinder-scheduler.

Every pool runs through the filters in order: where the volume's source is
(a snapshot or clone stays in its pool, a restore on the node holding the
backup), node usable, AvailabilityZoneFilter, CapacityFilter,
CapabilitiesFilter. The first filter a pool fails is its reason. Survivors
are weighed by CapacityWeigher: the most free capacity wins (virtual free
capacity for thin pools, as Cinder computes it). When no pool survives, the
explanation counts the reasons:
"0/2 pools: 1 wrong availability zone, 1 insufficient capacity (needs 20 GiB, 5 free)".

Extra specs follow Cinder's `extra_specs_ops`: a value may start with an
operator (`<is> True`, `<in> sub`, `<all-in> a b`, `<or> a <or> b`, `==`,
`!=`, `>=`, `<=`, `=` meaning "at least", `s==`, `s!=`, `s<`, `s<=`, `s>`,
`s>=`); anything else must equal the capability as a string. Keys scoped
`capabilities:` are matched without the scope, other scoped keys (qos:...)
are not capabilities and are ignored; `volume_backend_name` matches the
pool's backend.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

BACKEND_KEY = "volume_backend_name"


@dataclass(frozen=True)
class PoolState:
    """A pool as its node reports it, plus what the scheduler has placed on
    it since that report."""

    node: str
    backend: str
    pool: str
    zone: str
    usable: bool
    """The node's agent heartbeats and the node is not disabled."""
    total_gib: float
    free_gib: float
    provisioned_gib: float
    max_over_subscription_ratio: float = 1.0
    capabilities: Mapping[str, str] = field(default_factory=dict)
    pending_gib: float = 0.0
    """Volumes placed here that the report does not count yet."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.node, self.backend, self.pool)

    @property
    def thin(self) -> bool:
        return _truthy(self.capabilities.get("thin_provisioning_support", "False"))

    @property
    def free_for_request(self) -> float:
        """What the capacity filter compares a request against: virtual free
        capacity for thin pools, real free space for thick ones."""
        if self.thin:
            ratio = max(self.max_over_subscription_ratio, 1.0)
            return self.total_gib * ratio - self.provisioned_gib - self.pending_gib
        return self.free_gib - self.pending_gib


@dataclass(frozen=True)
class VolumeRequest:
    size_gib: int
    zone: str | None = None
    backend_name: str | None = None
    """The volume type's backend (`backendName`)."""
    extra_specs: Mapping[str, str] = field(default_factory=dict)
    """The volume type's extra specs."""
    only_node: str | None = None
    """The source's node (restore from a node-local backup)."""
    only_pool: tuple[str, str, str] | None = None
    """The source's (node, backend, pool) (snapshot, clone)."""
    source: str = ""
    """What pins the request, for explanations ("snapshot s1")."""


Filter = Callable[[PoolState, VolumeRequest], str | None]


def _source(pool: PoolState, req: VolumeRequest) -> str | None:
    if req.only_pool is not None and pool.key != req.only_pool:
        return f"not the pool of {req.source or 'the source'}"
    if req.only_node is not None and pool.node != req.only_node:
        return f"not on the node of {req.source or 'the source'}"
    return None


def _usable(pool: PoolState, req: VolumeRequest) -> str | None:
    return None if pool.usable else "node down or disabled"


def availability_zone_filter(pool: PoolState, req: VolumeRequest) -> str | None:
    if req.zone is None or pool.zone == req.zone:
        return None
    return "wrong availability zone"


def capacity_filter(pool: PoolState, req: VolumeRequest) -> str | None:
    if req.size_gib <= pool.free_for_request:
        return None
    return f"insufficient capacity (needs {req.size_gib} GiB)"


def capabilities_filter(pool: PoolState, req: VolumeRequest) -> str | None:
    if req.backend_name is not None and pool.backend != req.backend_name:
        return f"not backend {req.backend_name}"
    for key, wanted in sorted(req.extra_specs.items()):
        scope, _, name = key.rpartition(":")
        if scope and scope != "capabilities":
            continue  # qos:..., or another scope: not a capability
        have = pool.backend if name == BACKEND_KEY else pool.capabilities.get(name)
        if have is None or not match_spec(have, wanted):
            return f"capability {name} does not match {wanted!r}"
    return None


FILTERS: tuple[Filter, ...] = (
    _source,
    _usable,
    availability_zone_filter,
    capacity_filter,
    capabilities_filter,
)


@dataclass(frozen=True)
class Choice:
    node: str
    backend: str
    pool: str
    considered: int


@dataclass(frozen=True)
class NoValidBackend:
    reasons: dict[str, int]
    considered: int
    most_free_gib: float | None = None
    """Largest free capacity among pools refused for capacity."""

    @property
    def explanation(self) -> str:
        if self.considered == 0:
            return "0/0 pools: no node reports a storage pool"
        parts = []
        for reason, n in sorted(self.reasons.items(), key=lambda i: (-i[1], i[0])):
            if reason.startswith("insufficient capacity") and self.most_free_gib is not None:
                free = _fmt(max(self.most_free_gib, 0.0))
                reason = f"{reason[:-1]}, {'at most ' if n > 1 else ''}{free} free)"
            parts.append(f"{n} {reason}")
        return f"0/{self.considered} pools: " + ", ".join(parts)


def schedule(pools: Sequence[PoolState], req: VolumeRequest) -> Choice | NoValidBackend:
    reasons: Counter[str] = Counter()
    passed: list[PoolState] = []
    most_free: float | None = None
    for pool in pools:
        reason = next((r for f in FILTERS if (r := f(pool, req)) is not None), None)
        if reason is None:
            passed.append(pool)
            continue
        reasons[reason] += 1
        if reason.startswith("insufficient capacity"):
            free = pool.free_for_request
            most_free = free if most_free is None else max(most_free, free)
    if not passed:
        return NoValidBackend(dict(reasons), len(pools), most_free)
    best = max(passed, key=capacity_weight)
    return Choice(best.node, best.backend, best.pool, len(pools))


def capacity_weight(pool: PoolState) -> tuple[float, tuple[int, ...]]:
    """CapacityWeigher: most free capacity first; ties to the first pool by name."""
    name = "/".join(pool.key)
    return (pool.free_for_request, tuple(-ord(c) for c in name))


# --- extra specs ----------------------------------------------------------------

_NUMERIC: dict[str, Callable[[float, float], bool]] = {
    "=": operator.ge,  # Cinder: "=" means at least
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
}
_STRING: dict[str, Callable[[str, str], bool]] = {
    "s==": operator.eq,
    "s!=": operator.ne,
    "s<": operator.lt,
    "s<=": operator.le,
    "s>": operator.gt,
    "s>=": operator.ge,
}
OPERATORS = frozenset({*_NUMERIC, *_STRING, "<is>", "<in>", "<all-in>", "<or>"})


class InvalidSpec(ValueError):
    pass


def check_spec(value: str) -> None:
    """Raise InvalidSpec when an operator is used without an operand, or a
    numeric operator with a non-number."""
    words = value.split()
    if not words or words[0] not in OPERATORS:
        return
    op, rest = words[0], words[1:]
    if op == "<or>":
        return
    if not rest:
        raise InvalidSpec(f"{value!r}: {op} needs a value")
    if op in _NUMERIC:
        try:
            float(rest[0])
        except ValueError:
            raise InvalidSpec(f"{value!r}: {op} compares numbers, {rest[0]!r} is not one") from None
    if op == "<is>" and rest[0].lower() not in _BOOLS:
        raise InvalidSpec(f"{value!r}: <is> takes True or False")


def match_spec(have: str, wanted: str) -> bool:
    """Whether a pool's capability value satisfies an extra spec value."""
    words = wanted.split()
    if not words:
        return have == wanted
    op = words[0]
    if op == "<or>" or "<or>" in words:
        options = [w for w in words if w != "<or>"]
        return have in options
    if op == "<is>":
        return len(words) > 1 and _truthy(have) == _truthy(words[1])
    if op == "<in>":
        return len(words) > 1 and words[1] in have
    if op == "<all-in>":
        present = set(have.split())
        return all(w in present for w in words[1:])
    if op in _NUMERIC:
        try:
            return len(words) > 1 and _NUMERIC[op](float(have), float(words[1]))
        except ValueError:
            return False
    if op in _STRING:
        return len(words) > 1 and _STRING[op](have, words[1])
    if have.lower() in ("true", "false") and wanted.lower() in ("true", "false"):
        return have.lower() == wanted.lower()  # a boolean reported as True or true
    return have == wanted


_BOOLS = {"true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n"}


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "on", "t", "y")


def _fmt(gib: float) -> str:
    if gib >= 10 or gib == math.floor(gib):
        return str(math.floor(gib))
    return f"{math.floor(gib * 10) / 10:g}"
