"""Project quotas, enforced so that no interleaving of users, controller
workers or shards overshoots a limit.

Counts (instances, volumes, snapshots, backups, ports, floating IPs,
networks, subnets, routers, security groups, images) are the API server's own
business: the Project reconciler keeps a ResourceQuota with
`count/<plural>.<group>` in the project's namespace, so a creation over the
limit is refused at admission, atomically, with the API server's message.

Sums (cores, RAM, gigabytes, image MiB) cannot be counted at admission; they
follow Cinder's QuotaReserveTask/QuotaCommitTask. Each consumer (Instance,
Volume, VolumeSnapshot, VolumeBackup, a Resize's InstanceAction, an Image)
holds a reservation in a ledger, the Project's `status.reservations` keyed by
the consumer's uid, before the controller acts on it (schedules, places,
accepts; an Image once its data's size is known). Every write to
the ledger carries the Project's resourceVersion as a precondition, so two
workers can never both take the last core: the loser re-reads and is
refused. A refused consumer is Stalled with reason QuotaExceeded and holds
nothing. Deletion gives back: the Project reconciler drops the entries of
consumers that are gone (confirmed by a live listing, not a cache). After a
crash the ledger converges again: every consumer re-asserts its entry on its
next pass, and what is already placed is recorded without a check, so
lowering a quota below usage keeps what exists and refuses only what is new.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import structlog

from nubes.api.compute import Flavor, Instance, InstanceAction
from nubes.api.identity import Project, Quotas, Reservation, UsageItem
from nubes.api.image import Image
from nubes.api.meta import Resource
from nubes.api.network import FloatingIP, Network, Port, Router, SecurityGroup, Subnet
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot
from nubes.controllers.indexes import index_projects
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Stall

log = structlog.get_logger()

QUOTA_NAME = "nubes-project-quotas"
REASON = "QuotaExceeded"
CAS_ATTEMPTS = 100

# Quota field -> the kind whose objects it counts (enforced by ResourceQuota).
COUNTED: tuple[tuple[str, type[Resource[Any, Any]]], ...] = (
    ("instances", Instance),
    ("volumes", Volume),
    ("snapshots", VolumeSnapshot),
    ("backups", VolumeBackup),
    ("ports", Port),
    ("floating_ips", FloatingIP),
    ("networks", Network),
    ("subnets", Subnet),
    ("routers", Router),
    ("security_groups", SecurityGroup),
    ("images", Image),
)
# The kinds that hold ledger entries.
CONSUMERS: tuple[type[Resource[Any, Any]], ...] = (
    Instance,
    InstanceAction,
    Volume,
    VolumeSnapshot,
    VolumeBackup,
    Image,
)
CONSUMER_KINDS = {k.crd.kind: k for k in CONSUMERS}


# --- pure ledger logic ------------------------------------------------------------


@dataclass(frozen=True)
class Amounts:
    """What a consumer holds of the summed quotas."""

    cores: int = 0
    ram_mib: int = 0
    gigabytes: int = 0
    image_size_mib: int = 0

    @classmethod
    def of(cls, r: Reservation | None) -> Amounts:
        return cls() if r is None else cls(r.cores, r.ram_mib, r.gigabytes, r.image_size_mib)

    def get(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    @property
    def empty(self) -> bool:
        return not any(getattr(self, name) for name in SUMMED)


SUMMED = tuple(f.name for f in fields(Amounts))
# The quota's name as users write it in the Project spec.
WIRE = {
    "cores": "cores",
    "ram_mib": "ramMib",
    "gigabytes": "gigabytes",
    "image_size_mib": "imageSizeMib",
}


def limit_of(quotas: Quotas, name: str) -> int | None:
    """The limit, None when unlimited (-1, as in OpenStack)."""
    value: int | None = getattr(quotas, name)
    return None if value is None or value < 0 else value


def totals(ledger: Mapping[str, Reservation], *, without: str | None = None) -> Amounts:
    sums = dict.fromkeys(SUMMED, 0)
    for uid, r in ledger.items():
        if uid != without:
            for name in SUMMED:
                sums[name] += getattr(r, name)
    return Amounts(**sums)


@dataclass(frozen=True)
class Refusal:
    quota: str
    used: int
    limit: int
    need: int
    more: bool

    def message(self, what: str) -> str:
        return (
            f"{WIRE[self.quota]}: {self.used} of {self.limit} in use, this {what} needs"
            f" {self.need}{' more' if self.more else ''}"
        )


@dataclass(frozen=True)
class Change:
    """The ledger write: the new entry, or None to remove it."""

    entry: Reservation | None


def decide(
    ledger: Mapping[str, Reservation],
    quotas: Quotas,
    uid: str,
    kind: str,
    want: Amounts,
    held: Amounts = Amounts(),
) -> Change | Refusal | None:
    """Reserve `want` for consumer `uid`: None when the ledger already says
    so. Only growth beyond what the consumer holds in the ledger and beyond
    `held` (what it demonstrably consumes already, recorded without a check)
    is checked against the limits, so lowering a quota never evicts anything."""
    current = ledger.get(uid)
    have = Amounts.of(current)
    if want == have and (current is None) == want.empty:
        return None
    if want.empty:
        return Change(None)
    others = totals(ledger, without=uid)
    for name in SUMMED:
        wanted = want.get(name)
        limit = limit_of(quotas, name)
        if limit is None or wanted <= max(have.get(name), held.get(name)):
            continue
        if others.get(name) + wanted > limit:
            return Refusal(
                name,
                others.get(name) + have.get(name),
                limit,
                wanted - have.get(name),
                more=have.get(name) > 0,
            )
    return Change(Reservation(kind=kind, **{n: want.get(n) for n in SUMMED}))


def usage_summary(used: int, limit: int | None) -> UsageItem:
    # limit is set even when None (unlimited): the write clears an old limit.
    return UsageItem(
        used=used, limit=limit, summary=f"{used}/{'unlimited' if limit is None else limit}"
    )


def hard_limits(quotas: Quotas) -> dict[str, str]:
    """The ResourceQuota's spec.hard for the counted quotas."""
    hard = {}
    for name, kind in COUNTED:
        limit = limit_of(quotas, name)
        if limit is not None:
            hard[f"count/{kind.crd.plural}.{kind.crd.group}"] = str(limit)
    return hard


# --- ledger writes ------------------------------------------------------------------


def index_consumers(op: Operator) -> None:
    """Indexes the quota code reads (idempotent; every reconciler may call it)."""
    index_projects(op)
    for _, kind in COUNTED:
        op.store(kind).add_index("quota-namespace", _namespace_of)
    for kind in CONSUMERS:
        store = op.store(kind)
        store.add_index("quota-namespace", _namespace_of)
        store.add_index("quota-uid", _uid_of)


def _namespace_of(obj: Any) -> list[str]:
    return [obj.namespace or ""]


def _uid_of(obj: Any) -> list[str]:
    return [obj.uid]


def project_for(op: Operator, namespace: str | None) -> Project | None:
    for project in op.store(Project).by_index("namespace", namespace or ""):
        found: Project = project
        return found
    return None


def requeue_refused(op: Operator, kind: type[Resource[Any, Any]]) -> None:
    """Objects of `kind` refused for quota are tried again when their project's
    ledger or limits change (something was given back, or a quota raised)."""
    index_consumers(op)

    def facts(p: Project | None) -> Any:
        if p is None:
            return None
        return p.spec.quotas, totals(p.status.reservations)

    op.watch(
        Project,
        kind,
        lambda p: [
            o.key
            for o in op.store(kind).by_index("quota-namespace", p.status.namespace or p.name)
            if _refused(o)
        ],
        when=lambda old, new: new is not None and facts(old) != facts(new),
    )


def _refused(obj: Any) -> bool:
    cond = obj.status.condition("Stalled")
    return cond is not None and cond.status == "True" and cond.reason == REASON


async def hold(
    op: Operator,
    obj: Resource[Any, Any],
    want: Amounts,
    *,
    held: Amounts = Amounts(),
    what: str,
) -> None:
    """Record `want` for `obj` in its project's ledger, or raise
    Stall(QuotaExceeded). Namespaces no project owns have no quotas."""
    project = project_for(op, obj.namespace)
    if project is None:
        return
    kind = obj.crd.kind
    if decide(project.status.reservations, project.spec.quotas, obj.uid, kind, want) is None:
        return  # the cache already shows it: nothing to write
    for _ in range(CAS_ATTEMPTS):
        fresh = await op.kube.get(Project, project.name)
        if fresh is None or fresh.uid != project.uid:
            return
        result = decide(fresh.status.reservations, fresh.spec.quotas, obj.uid, kind, want, held)
        if result is None:
            return
        if isinstance(result, Refusal):
            log.info("quota exceeded", project=fresh.name, consumer=obj.key, kind=kind)
            raise Stall(REASON, result.message(what))
        if await _write(op, fresh, {obj.uid: result.entry.wire() if result.entry else None}):
            return
    raise ApiError(409, f"project {project.name}: quota ledger kept changing")


async def release(op: Operator, obj: Resource[Any, Any]) -> None:
    """Give back everything `obj` holds."""
    await hold(op, obj, Amounts(), what=obj.crd.kind)


async def drop(op: Operator, project: Project, uids: Iterable[str]) -> None:
    """Remove the entries of consumers that are gone."""
    gone = set(uids)
    for _ in range(CAS_ATTEMPTS):
        fresh = await op.kube.get(Project, project.name)
        if fresh is None or fresh.uid != project.uid:
            return
        present = gone & set(fresh.status.reservations)
        if not present:
            return
        if await _write(op, fresh, dict.fromkeys(present)):
            log.info("quota released", project=fresh.name, consumers=len(present))
            return
    raise ApiError(409, f"project {project.name}: quota ledger kept changing")


async def _write(op: Operator, fresh: Project, entries: dict[str, Any]) -> bool:
    """One compare-and-swap on the ledger; False when someone wrote first."""
    body = {
        "metadata": {"resourceVersion": fresh.metadata.resource_version},
        "status": {"reservations": entries},
    }
    try:
        await op.kube.patch_raw(path_of(Project), fresh.name, body, subresource="status")
    except ApiError as e:
        if not e.conflict:
            raise
        # Spread the retries of many workers racing for one ledger.
        await asyncio.sleep(random.uniform(0, 0.05))
        return False
    return True


def quota_refusal(e: ApiError) -> str | None:
    """The API server's message when a ResourceQuota refused a creation."""
    if e.status == 403 and "exceeded quota" in str(e):
        body = e.body
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        return str(message)
    return None


# --- what each consumer holds --------------------------------------------------------------


def instance_amounts(inst: Instance, flavor: Flavor) -> tuple[Amounts, Amounts]:
    """(want, held) of an instance: a shelved and offloaded instance holds no
    cores or RAM (its node freed them), so unshelving reserves them again; an
    instance on a node keeps what it has (a completed Resize was paid for by
    its InstanceAction)."""
    if inst.spec.power_state == "Shelved" and inst.status.shelved_disk and not inst.status.node:
        return Amounts(), Amounts()
    want = Amounts(cores=flavor.spec.vcpus, ram_mib=flavor.spec.ram_mib)
    return want, want if inst.status.node else Amounts()


def covers(ledger: Mapping[str, Reservation], uid: str, want: Amounts) -> bool:
    """Whether the ledger already holds at least `want` for consumer `uid`."""
    have = Amounts.of(ledger.get(uid))
    return all(have.get(name) >= want.get(name) for name in SUMMED)


def resize_amounts(old: Flavor | None, new: Flavor) -> Amounts:
    """The growth a Resize reserves until it completes."""
    return Amounts(
        cores=max(0, new.spec.vcpus - (old.spec.vcpus if old else 0)),
        ram_mib=max(0, new.spec.ram_mib - (old.spec.ram_mib if old else 0)),
    )


def image_amounts(size_bytes: int) -> Amounts:
    """An image's data in whole MiB, rounded up."""
    return Amounts(image_size_mib=-(-size_bytes // 2**20))


def volume_amounts(vol: Volume) -> tuple[Amounts, Amounts]:
    """(want, held): the spec size; what the storage node already holds (or
    was placed for) is kept, an extend beyond it is checked."""
    backing = vol.status.backing
    if backing is not None:
        held = backing.size_gib
    else:
        held = vol.status.granted_size_gib or 0 if vol.status.node else 0
    return Amounts(gigabytes=vol.spec.size_gib), Amounts(gigabytes=held)
