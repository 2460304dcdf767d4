"""Choosing a compute node for an instance (pure), after Nova's filter scheduler.

Every node runs through the filters in order; the first filter a node fails
is its reason. Survivors are weighed (most free RAM first, as Nova's default
RAMWeigher). When none survives, the explanation counts the reasons:
"0/3 nodes are available: 2 insufficient RAM, 1 wrong availability zone".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HostState:
    name: str
    zone: str
    usable: bool
    """Agent heartbeating and node not disabled."""
    vcpus: int
    ram_mib: int
    disk_gib: int
    vcpus_used: int = 0
    ram_mib_used: int = 0
    disk_gib_used: int = 0
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.5
    disk_allocation_ratio: float = 1.0
    reserved_ram_mib: int = 512
    traits: frozenset[str] = frozenset()
    hypervisor_type: str = "QEMU"

    @property
    def free_ram_mib(self) -> float:
        return self.ram_mib * self.ram_allocation_ratio - self.reserved_ram_mib - self.ram_mib_used

    @property
    def free_vcpus(self) -> float:
        return self.vcpus * self.cpu_allocation_ratio - self.vcpus_used

    @property
    def free_disk_gib(self) -> float:
        return self.disk_gib * self.disk_allocation_ratio - self.disk_gib_used


@dataclass(frozen=True)
class RequestSpec:
    vcpus: int
    ram_mib: int
    disk_gib: int
    zone: str | None = None
    required_traits: frozenset[str] = frozenset()
    forbidden_traits: frozenset[str] = frozenset()
    image_properties: dict[str, str] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()
    """Nodes that must not be chosen (the current node, for a migration)."""
    only: str | None = None
    """A node the request is pinned to (migration to a given node)."""


Filter = Callable[[HostState, RequestSpec], str | None]


def _requested(host: HostState, req: RequestSpec) -> str | None:
    if req.only is not None and host.name != req.only:
        return "not the requested node"
    if host.name in req.exclude:
        return "excluded (current node)"
    return None


def _compute(host: HostState, req: RequestSpec) -> str | None:
    return None if host.usable else "node down or disabled"


def _zone(host: HostState, req: RequestSpec) -> str | None:
    if req.zone is None or host.zone == req.zone:
        return None
    return f"wrong availability zone (wants {req.zone})"


def _ram(host: HostState, req: RequestSpec) -> str | None:
    return (
        None if host.free_ram_mib >= req.ram_mib else f"insufficient RAM (needs {req.ram_mib} MiB)"
    )


def _cores(host: HostState, req: RequestSpec) -> str | None:
    return None if host.free_vcpus >= req.vcpus else f"insufficient vCPUs (needs {req.vcpus})"


def _disk(host: HostState, req: RequestSpec) -> str | None:
    return (
        None
        if host.free_disk_gib >= req.disk_gib
        else f"insufficient disk (needs {req.disk_gib} GiB)"
    )


def _traits(host: HostState, req: RequestSpec) -> str | None:
    if not req.required_traits <= host.traits:
        return "missing required traits"
    if req.forbidden_traits & host.traits:
        return "has forbidden traits"
    return None


def _image(host: HostState, req: RequestSpec) -> str | None:
    wanted = req.image_properties.get("hypervisor_type")
    if wanted and wanted.lower() != host.hypervisor_type.lower():
        return "image needs another hypervisor type"
    return None


FILTERS: tuple[Filter, ...] = (_requested, _compute, _zone, _ram, _cores, _disk, _traits, _image)


@dataclass(frozen=True)
class Choice:
    host: str
    considered: int


@dataclass(frozen=True)
class NoValidHost:
    reasons: dict[str, int]
    considered: int

    @property
    def explanation(self) -> str:
        parts = ", ".join(
            f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda i: (-i[1], i[0]))
        )
        return f"0/{self.considered} nodes are available" + (f": {parts}" if parts else "")


def schedule(hosts: Sequence[HostState], req: RequestSpec) -> Choice | NoValidHost:
    reasons: Counter[str] = Counter()
    passed: list[HostState] = []
    for host in hosts:
        reason = next((r for f in FILTERS if (r := f(host, req)) is not None), None)
        if reason is None:
            passed.append(host)
        else:
            reasons[reason] += 1
    if not passed:
        return NoValidHost(dict(reasons), len(hosts))
    best = max(passed, key=lambda h: (h.free_ram_mib, h.free_vcpus, _stable(h.name)))
    return Choice(best.name, len(hosts))


def _stable(name: str) -> tuple[int, ...]:
    # Ties go to the alphabetically first node.
    return tuple(-ord(c) for c in name)


def traits_from_extra_specs(extra_specs: dict[str, str]) -> tuple[frozenset[str], frozenset[str]]:
    """Nova's `trait:NAME=required|forbidden` flavor extra specs."""
    required: set[str] = set()
    forbidden: set[str] = set()
    for key, value in extra_specs.items():
        if key.startswith("trait:"):
            if value == "required":
                required.add(key.removeprefix("trait:"))
            elif value == "forbidden":
                forbidden.add(key.removeprefix("trait:"))
    return frozenset(required), frozenset(forbidden)
