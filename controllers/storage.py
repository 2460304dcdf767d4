"""What the block-storage reconcilers share: finalizer names, the pools the
nodes report, and how the storage agent's reports turn into conditions.

Status ownership (see api/storage.py): the controller writes placement
(backend/node/pool), attachment, bootable, and for snapshots and backups the
node, volume uid and parent; the storage node's agent writes what exists
there (backing, export, sizes, backup facts) and `nodeProblem`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from nubes.api.compute import Hypervisor, Instance
from nubes.api.meta import ApiModel, NodeProblem
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot
from nubes.controllers.volume_scheduler import PoolState
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Stall, StatusFields, Wait

M = TypeVar("M", bound=ApiModel)

DEFAULT_VOLUME_TYPE = "default"
"""The VolumeType used when a volume names none (if it exists)."""


def node_usable(hv: Hypervisor) -> bool:
    return hv.status.is_true("Ready") and not hv.spec.disabled and not hv.deleting


def pool_states(op: Operator, pending: dict[tuple[str, str, str], float]) -> list[PoolState]:
    """Every pool every node reports, with what was placed since its report."""
    found = []
    for hv in op.store(Hypervisor):
        for p in hv.status.storage_pools:
            key = (hv.name, p.backend, p.pool)
            found.append(
                PoolState(
                    node=hv.name,
                    backend=p.backend,
                    pool=p.pool,
                    zone=hv.spec.availability_zone,
                    usable=node_usable(hv),
                    total_gib=float(p.total_gib),
                    free_gib=float(p.free_gib),
                    provisioned_gib=float(p.provisioned_gib),
                    max_over_subscription_ratio=p.max_over_subscription_ratio,
                    capabilities=dict(p.capabilities),
                    pending_gib=pending.get(key, 0.0),
                )
            )
    return sorted(found, key=lambda s: s.key)


def storage_facts(hv: Hypervisor | None) -> tuple[Any, ...] | None:
    """What a Hypervisor change must alter to matter to storage placement."""
    if hv is None:
        return None
    pools = tuple(
        (p.backend, p.pool, p.free_gib, p.provisioned_gib) for p in hv.status.storage_pools
    )
    return (node_usable(hv), hv.spec.availability_zone, pools, hv.status.host_ip)


def merged(current: M | None, wanted: M | None) -> M | None:
    """A nested status object for a write: the wanted value's fields that are
    not None, and the fields the current value has and the wanted value lacks
    set to None explicitly, or the API server would keep them. (A field that
    cannot be None cannot be cleared: validation fails here, at the writer.)"""
    if wanted is None:
        return None
    out = {k: v for k, v in wanted.patch().items() if v is not None}
    for key in current.wire() if current is not None else {}:
        out.setdefault(key, None)
    return type(wanted).model_validate(out)


def agent_problem(error: NodeProblem | None, where: str, status: StatusFields) -> Outcome | None:
    """A node agent's report (status.nodeProblem) as the object's state, with
    the agent's reason: Stalled when it waits for a change, Reconciling while
    it retries."""
    if error is None:
        return None
    message = f"{where}: {error.message}"
    if error.retryable:
        return Outcome.progressing(error.reason, message, status, requeue_after=30)
    return Outcome.stalled(error.reason, message, status)


def source_key(volume: Volume) -> str | None:
    """`kind:namespace/name` of what the volume is filled from."""
    src = volume.spec.source
    if src is None:
        return None
    if src.snapshot:
        return f"snapshot:{volume.namespace}/{src.snapshot}"
    if src.volume:
        return f"volume:{volume.namespace}/{src.volume}"
    if src.backup:
        return f"backup:{volume.namespace}/{src.backup}"
    if src.image:
        return f"image:{src.image.namespace or volume.namespace}/{src.image.name}"
    return None


def describe_source(volume: Volume) -> str:
    key = source_key(volume) or ""
    kind, _, ref = key.partition(":")
    return f"{kind} {ref if kind == 'image' else ref.split('/', 1)[-1]}"


def filled(volume: Volume) -> bool:
    """The agent reports the volume and its initial contents in place."""
    backing = volume.status.backing
    return backing is not None and backing.source_done


def needs_source(volume: Volume) -> list[str]:
    """Index: the source a volume still reads (until it is filled)."""
    key = source_key(volume)
    return [key] if key and not filled(volume) and not volume.deleting else []


def instance_volume_names(inst: Instance) -> set[str]:
    """Volumes an instance asks for (spec) or holds (the compute agent's report)."""
    wanted = {v.volume for v in inst.spec.volumes} | set(inst.status.attached_volumes)
    if inst.spec.boot_volume is not None:
        wanted.add(inst.spec.boot_volume.name)
    return wanted


def _unbacked_pool(v: Volume) -> list[str]:
    """Index: node/backend/pool of a volume placed but not yet created there."""
    s = v.status
    if s.node and s.backend and s.pool and s.backing is None and not v.deleting:
        return [f"{s.node}/{s.backend}/{s.pool}"]
    return []


def add_indexes(op: Operator) -> None:
    """The indexes the storage reconcilers read (each adds them all, so any
    one of them works alone: the same functions each time)."""
    op.store(Volume).add_index("storage-source", needs_source)
    op.store(Volume).add_index("storage-unbacked", _unbacked_pool)
    op.store(Volume).add_index("storage-type", _unplaced_type)
    op.store(Instance).add_index("storage-volume", _instance_volumes)
    op.store(VolumeSnapshot).add_index("storage-volume", _volume_key)
    backups = op.store(VolumeBackup)
    backups.add_index("storage-volume", _volume_key)
    backups.add_index("storage-volume-uid", _backup_volume_uid)
    backups.add_index("storage-parent", _backup_parent)


def _unplaced_type(v: Volume) -> list[str]:
    return [v.spec.volume_type or DEFAULT_VOLUME_TYPE] if not v.status.node else []


def _instance_volumes(i: Instance) -> list[str]:
    return [f"{i.namespace}/{n}" for n in sorted(instance_volume_names(i))]


def _volume_key(obj: VolumeSnapshot | VolumeBackup) -> list[str]:
    return [f"{obj.namespace}/{obj.spec.volume}"]


def _backup_volume_uid(b: VolumeBackup) -> list[str]:
    return [b.status.volume_uid or ""]


def _backup_parent(b: VolumeBackup) -> list[str]:
    return [f"{b.namespace}/{b.status.parent}"] if b.status.parent else []


def copyable_volume(
    op: Operator, name: str, namespace: str | None, *, force: bool, what: str
) -> Volume:
    """The volume a snapshot or backup reads, or Wait/Stall saying why not:
    it must exist and be created, and not be attached unless forced (the
    guest may be writing: the copy would be inconsistent)."""
    vol: Volume | None = op.store(Volume).lookup(name, namespace)
    if vol is None:
        raise Wait("VolumeNotFound", f"volume {name} does not exist", 10)
    if vol.deleting:
        raise Stall("VolumeDeleting", f"volume {name} is being deleted")
    if not filled(vol) or vol.status.node is None:
        raise Wait("VolumeNotReady", f"volume {name} is not created yet", 5)
    attachment = vol.status.attachment
    if attachment is not None and not force:
        raise Stall(
            "VolumeAttached",
            f"volume {name} is attached to instance {attachment.instance}: detach it, or set"
            f" force: true and accept a possibly inconsistent {what}",
        )
    return vol


def names(items: list[Any], limit: int = 5) -> str:
    shown = ", ".join(sorted(i.name for i in items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
