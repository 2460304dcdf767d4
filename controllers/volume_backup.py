"""VolumeBackup: taken on the volume's storage node into its backup store.

The controller records, once, the node, the volume's uid (the backup outlives
the volume) and, for an incremental backup, the parent: the latest Ready
backup of the same volume. The storage agent writes the backup and reports
its facts; the backup is Ready when they are there. A backup another
incremental one builds on cannot be deleted first (HasDependentBackups).
"""

from __future__ import annotations

from typing import Any

from nubes.api.storage import BACKUP_FINALIZER, Volume, VolumeBackup, VolumeBackupStatus
from nubes.controllers.quota import Amounts, hold, requeue_refused
from nubes.controllers.storage import (
    add_indexes,
    agent_problem,
    copyable_volume,
    names,
)
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall


def _created(b: VolumeBackup) -> tuple[str, str]:
    return (b.metadata.creation_timestamp or "", b.name)


class VolumeBackupReconciler(Reconciler[VolumeBackup]):
    kind = VolumeBackup
    finalizer = BACKUP_FINALIZER
    workers = 4

    def setup(self, op: Operator) -> None:
        super().setup(op)
        add_indexes(op)
        backups = op.store(VolumeBackup)
        self.backups = backups
        self.volumes = op.store(Volume)
        requeue_refused(op, VolumeBackup)
        op.watch(
            Volume,
            VolumeBackup,
            lambda v: [
                *(b.key for b in backups.by_index("storage-volume", v.key) if not b.status.node),
                *(
                    [f"{v.namespace}/{v.spec.source.backup}"]
                    if v.spec.source and v.spec.source.backup
                    else []
                ),
            ],
        )
        # Incremental backups wait for a parent; parents wait for their children to go.
        op.watch(
            VolumeBackup,
            VolumeBackup,
            lambda b: [
                *([f"{b.namespace}/{b.status.parent}"] if b.status.parent else []),
                *(
                    x.key
                    for x in backups.by_index("storage-volume", f"{b.namespace}/{b.spec.volume}")
                    if x.spec.incremental and not x.status.node
                ),
            ],
            when=lambda old, new: old is None or new is None or _facts(old) != _facts(new),
        )

    async def converge(self, obj: VolumeBackup) -> Outcome:
        s = obj.status
        if s.node is None or s.volume_uid is None:
            status = self._decide(obj)
            # A backup holds its volume's size in gigabytes, reserved before it is taken.
            vol = self.volumes.lookup(obj.spec.volume, obj.namespace)
            size = vol.spec.size_gib if vol is not None else 0
            await hold(self.op, obj, Amounts(gigabytes=size), what="backup")
        else:
            if s.size_gib is not None:
                taken = Amounts(gigabytes=s.size_gib)
                await hold(self.op, obj, taken, held=taken, what="backup")
            status = VolumeBackupStatus(node=s.node, volume_uid=s.volume_uid, parent=s.parent)
        kind = "incremental backup" if status.parent else "full backup"
        where = f"{kind} of volume {obj.spec.volume} on node {status.node}"
        if s.container and s.chunks is not None:
            parent = f" on top of {s.parent}" if s.parent else ""
            return Outcome.ready(
                status,
                f"{s.size_gib} GiB {where}{parent}: {s.chunks_stored} of {s.chunks} chunks"
                f" written, {s.stored_bytes} bytes",
            )
        problem = agent_problem(s.node_problem, where, status)
        if problem:
            return problem
        return Outcome.progressing("BackingUp", f"taking the {where}", status)

    def _decide(self, obj: VolumeBackup) -> VolumeBackupStatus:
        name = obj.spec.volume
        vol = copyable_volume(self.op, name, obj.namespace, force=obj.spec.force, what="backup")
        parent = None
        if obj.spec.incremental:
            earlier = [
                b
                for b in self.backups.by_index("storage-volume-uid", vol.uid)
                if b.uid != obj.uid
                and b.status.is_true("Ready")
                and not b.deleting
                and _created(b) < _created(obj)
            ]
            if not earlier:
                raise Stall(
                    "NoParentBackup",
                    f"no ready backup of volume {name} to build on: take a full backup first",
                )
            parent = max(earlier, key=_created).name
        return VolumeBackupStatus(node=vol.status.node, volume_uid=vol.uid, parent=parent)

    async def finalize(self, obj: VolumeBackup) -> Outcome | None:
        children = self.backups.by_index("storage-parent", obj.key)
        if children:
            return Outcome.stalled(
                "HasDependentBackups",
                f"incremental backups build on backup {obj.name} ({names(children)});"
                " delete them first",
            )
        restoring = self.volumes.by_index("storage-source", f"backup:{obj.key}")
        if restoring:
            return Outcome.progressing(
                "InUse",
                f"volumes are being restored from backup {obj.name}: {names(restoring)}",
                requeue_after=5,
            )
        return None


def _facts(b: VolumeBackup) -> tuple[Any, ...]:
    return (b.status.parent, b.status.is_true("Ready"), b.deleting, b.status.volume_uid)
