"""VolumeSnapshot: taken on the volume's node, refused while the volume is
attached unless forced (the data may be inconsistent), deletable once no
volume is still being copied from it.

The controller sets status.node (the go-ahead); the storage agent takes the
snapshot and reports its size.
"""

from __future__ import annotations

from nubes.api.storage import SNAPSHOT_FINALIZER, Volume, VolumeSnapshot, VolumeSnapshotStatus
from nubes.controllers.quota import Amounts, hold, requeue_refused
from nubes.controllers.storage import (
    add_indexes,
    agent_problem,
    copyable_volume,
    names,
)
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler


class VolumeSnapshotReconciler(Reconciler[VolumeSnapshot]):
    kind = VolumeSnapshot
    finalizer = SNAPSHOT_FINALIZER
    workers = 4

    def setup(self, op: Operator) -> None:
        super().setup(op)
        add_indexes(op)
        snapshots = op.store(VolumeSnapshot)
        volumes = op.store(Volume)
        op.watch(
            Volume,
            VolumeSnapshot,
            lambda v: [
                *(s.key for s in snapshots.by_index("storage-volume", v.key)),
                *(
                    [f"{v.namespace}/{v.spec.source.snapshot}"]
                    if v.spec.source and v.spec.source.snapshot
                    else []
                ),
            ],
        )
        self.volumes = volumes
        requeue_refused(op, VolumeSnapshot)

    async def converge(self, obj: VolumeSnapshot) -> Outcome:
        volume_name = obj.spec.volume
        node = obj.status.node
        if node is None:
            vol = copyable_volume(
                self.op, volume_name, obj.namespace, force=obj.spec.force, what="snapshot"
            )
            # A snapshot holds its volume's size in gigabytes, reserved before it is taken.
            await hold(self.op, obj, Amounts(gigabytes=vol.spec.size_gib), what="snapshot")
            node = vol.status.node
        elif obj.status.size_gib is not None:
            taken = Amounts(gigabytes=obj.status.size_gib)
            await hold(self.op, obj, taken, held=taken, what="snapshot")
        status = VolumeSnapshotStatus(node=node)
        where = f"snapshot of volume {volume_name} on node {node}"
        if obj.status.size_gib is not None:
            return Outcome.ready(status, f"{obj.status.size_gib} GiB {where}")
        problem = agent_problem(obj.status.node_problem, where, status)
        if problem:
            return problem
        return Outcome.progressing("Creating", f"taking the {where}", status)

    async def finalize(self, obj: VolumeSnapshot) -> Outcome | None:
        copying = self.volumes.by_index("storage-source", f"snapshot:{obj.key}")
        if copying:
            return Outcome.progressing(
                "InUse",
                f"volumes are being created from snapshot {obj.name}: {names(copying)}",
                requeue_after=5,
            )
        return None
