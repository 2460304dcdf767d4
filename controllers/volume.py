"""Volume: placement (cinder-scheduler), attachment, and safe deletion.

The controller decides; the storage node's agent does (nubes.agent.storage):

- placement: once, sticky. The volume type and the source are resolved
  (a snapshot or clone stays in its source's pool, a restore goes to the
  node holding the backup, an image must be visible to the project), then
  `volume_scheduler.schedule` picks a pool or explains why none fits.
- attachment: the Instance in the namespace whose spec.volumes or
  spec.bootVolume names the volume; the first by creation time wins and keeps
  it while its spec names the volume or while its status.attachedVolumes
  (the compute agent's report) still lists it, so a detach is flushed before
  the storage agent removes the export.
- state: Ready once the agent reports the backing at the spec size and, if
  attached, the export; an extend waits for a detach (the agent grows only
  detached volumes).
- deletion: refused while snapshots exist (HasSnapshots) or while attached
  (InUse); waits for clones and backups reading it; then the controller's
  finalizer goes and the agent wipes the data and drops its own.

(About 470 lines: placement, attachment and deletion hand the same volume
between them in one converge function.)
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

import structlog

from nubes.api.compute import Hypervisor, Instance
from nubes.api.image import Image
from nubes.api.meta import ProjectRef
from nubes.api.storage import (
    VOLUME_FINALIZER,
    Volume,
    VolumeAttachmentStatus,
    VolumeBackup,
    VolumeSnapshot,
    VolumeStatus,
    VolumeType,
)
from nubes.controllers.access import require_volume_type
from nubes.controllers.image import project_of_namespace, visible
from nubes.controllers.indexes import index_projects
from nubes.controllers.quota import hold, requeue_refused, volume_amounts
from nubes.controllers.storage import (
    DEFAULT_VOLUME_TYPE,
    add_indexes,
    agent_problem,
    describe_source,
    filled,
    instance_volume_names,
    merged,
    names,
    node_usable,
    pool_states,
    storage_facts,
)
from nubes.controllers.volume_scheduler import Choice, VolumeRequest, schedule
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

log = structlog.get_logger()

GIB = 1024**3
# A placement this worker wrote but the watch cache does not show yet counts
# against its pool for at most this long.
PLACED_GRACE_SECONDS = 30.0


def _asks_for(inst: Instance, name: str) -> bool:
    boot = inst.spec.boot_volume is not None and inst.spec.boot_volume.name == name
    return boot or any(v.volume == name for v in inst.spec.volumes)


def _holds(inst: Instance, name: str) -> bool:
    return name in inst.status.attached_volumes


def _first(instances: list[Instance]) -> Instance:
    return min(instances, key=lambda i: (i.metadata.creation_timestamp or "", i.name))


class VolumeReconciler(Reconciler[Volume]):
    kind = Volume
    finalizer = VOLUME_FINALIZER
    workers = 8

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self._placed: dict[str, tuple[str, tuple[str, str, str], int, float]] = {}
        add_indexes(op)
        volumes = op.store(Volume)
        op.store(VolumeType)
        op.store(Image)
        index_projects(op)
        requeue_refused(op, Volume)

        def pending_of(prefix: str, key: str) -> list[str]:
            return [v.key for v in volumes.by_index("storage-source", f"{prefix}:{key}")]

        op.watch(
            Instance,
            Volume,
            lambda i: [f"{i.namespace}/{n}" for n in instance_volume_names(i)],
            when=lambda old, new: _instance_facts(old) != _instance_facts(new),
        )
        op.watch(
            VolumeType,
            Volume,
            lambda t: [v.key for v in volumes.by_index("storage-type", t.name)],
        )
        op.watch(
            Hypervisor,
            Volume,
            lambda _: [v.key for v in volumes if not v.status.node],
            when=lambda old, new: storage_facts(old) != storage_facts(new),
        )
        op.watch(
            VolumeSnapshot,
            Volume,
            lambda s: [f"{s.namespace}/{s.spec.volume}", *pending_of("snapshot", s.key)],
        )
        op.watch(
            VolumeBackup,
            Volume,
            lambda b: [f"{b.namespace}/{b.spec.volume}", *pending_of("backup", b.key)],
        )
        # Clones wait for their source; a source being deleted waits for its clones.
        op.watch(
            Volume,
            Volume,
            lambda v: [
                *pending_of("volume", v.key),
                *(
                    [f"{v.namespace}/{v.spec.source.volume}"]
                    if v.spec.source and v.spec.source.volume
                    else []
                ),
            ],
        )
        op.watch(Image, Volume, lambda img: pending_of("image", img.key))

    # --- converge ---------------------------------------------------------------------

    async def converge(self, obj: Volume) -> Outcome:
        attachment, waiting = self._attachment(obj, grant=True)
        # Fields are set as far as this pass gets: a Stall or Wait writes those.
        status = VolumeStatus(attachment=merged(obj.status.attachment, attachment))
        try:
            # Gigabytes are reserved before placement and before an extend; the
            # storage agent creates and grows the volume only up to the grant.
            want, held = volume_amounts(obj)
            await hold(self.op, obj, want, held=held, what="volume")
            status.granted_size_gib = obj.spec.size_gib
            status.node, status.backend, status.pool = self._placement(obj)
            status.bootable = self._bootable(obj)
        except Stall as s:
            return Outcome.stalled(s.reason, s.message, status)
        except Wait as w:
            return Outcome.progressing(w.reason, w.message, status, requeue_after=w.retry_after)
        return self._state(obj, status, attachment, waiting)

    def _state(
        self,
        obj: Volume,
        status: VolumeStatus,
        attachment: VolumeAttachmentStatus | None,
        waiting: list[Instance],
    ) -> Outcome:
        name, size = obj.name, obj.spec.size_gib
        where = f"node {status.node}, pool {status.backend}/{status.pool}"
        backing = obj.status.backing
        problem = agent_problem(obj.status.node_problem, where, status)
        hv = self.op.store(Hypervisor).lookup(status.node or "")
        down = "" if hv is not None and node_usable(hv) else " (the node's agent is not ready)"
        if backing is None or not backing.source_done:
            if problem:
                return problem
            what = f"copying {describe_source(obj)} into it" if obj.spec.source else "creating"
            return Outcome.progressing("Creating", f"{what} on {where}{down}", status)
        holder = f"instance {attachment.instance}" if attachment else ""
        if backing.size_gib < size:
            if attachment:
                return Outcome.progressing(
                    "ExtendWaitingForDetach",
                    f"volume {name} is attached to {holder}: it grows from {backing.size_gib}"
                    f" to {size} GiB once detached (volumes are extended only while available)",
                    status,
                )
            if problem:
                return problem
            return Outcome.progressing(
                "Extending", f"growing from {backing.size_gib} to {size} GiB on {where}", status
            )
        others = (
            f"; {len(waiting)} more instance(s) ask for it ({names(waiting)}) but a volume"
            " attaches to one instance at a time"
            if waiting
            else ""
        )
        export = obj.status.export
        if attachment:
            if export is None or export.initiator_node != attachment.node:
                if problem:
                    return problem
                return Outcome.progressing(
                    "Exporting", f"exporting to {holder} on {where}{down}{others}", status
                )
            return Outcome.ready(
                status, f"{size} GiB on {where}, in use by {holder} ({export.iqn}){others}"
            )
        if export is not None:
            return Outcome.progressing(
                "Unexporting", f"removing the iSCSI export on {where}{down}", status
            )
        return Outcome.ready(status, f"{size} GiB on {where}, available{others}")

    # --- attachment ----------------------------------------------------------------------

    def _attachment(
        self, obj: Volume, *, grant: bool
    ) -> tuple[VolumeAttachmentStatus | None, list[Instance]]:
        """(attachment, other instances asking for the volume)."""
        name = obj.name
        instances = self.op.store(Instance).by_index("storage-volume", obj.key)
        current = obj.status.attachment
        holder = None
        if current is not None:
            holder = next(
                (
                    i
                    for i in instances
                    if i.uid == current.instance_uid
                    and (_holds(i, name) or (_asks_for(i, name) and not i.deleting))
                ),
                None,
            )
        if holder is None:
            holding = [i for i in instances if _holds(i, name)]
            if holding:
                holder = _first(holding)
        asking = [i for i in instances if _asks_for(i, name) and not i.deleting]
        if holder is None and grant and asking:
            holder = _first(asking)
        waiting = [i for i in asking if holder is None or i.uid != holder.uid]
        if holder is None:
            return None, waiting
        boot = holder.spec.boot_volume is not None and holder.spec.boot_volume.name == name
        attachment = VolumeAttachmentStatus(
            instance=holder.name, instance_uid=holder.uid, node=holder.status.node, boot=boot
        )
        return attachment, waiting

    # --- placement ----------------------------------------------------------------------

    def _placement(self, obj: Volume) -> tuple[str, str, str]:
        """(node, backend, pool)"""
        if obj.status.node and obj.status.backend and obj.status.pool:
            return obj.status.node, obj.status.backend, obj.status.pool
        request = self._request(obj)
        result = schedule(pool_states(self.op, self._pending()), request)
        if not isinstance(result, Choice):
            raise Stall(
                "NoValidBackend", f"no pool can hold volume {obj.name}: {result.explanation}"
            )
        pool = (result.node, result.backend, result.pool)
        self._placed[obj.key] = (obj.uid, pool, obj.spec.size_gib, time.monotonic())
        log.info("volume placed", volume=obj.key, node=result.node, pool=f"{pool[1]}/{pool[2]}")
        return pool

    def _pending(self) -> dict[tuple[str, str, str], float]:
        """GiB placed per pool that the nodes' reports may not count yet: volumes
        placed there without a backing yet, and this worker's placements the
        watch cache does not show yet."""
        pending: dict[tuple[str, str, str], float] = defaultdict(float)
        volumes = self.op.store(Volume)
        for hv in self.op.store(Hypervisor):
            for p in hv.status.storage_pools:
                key = (hv.name, p.backend, p.pool)
                unbacked = volumes.by_index("storage-unbacked", "/".join(key))
                pending[key] += sum(v.spec.size_gib for v in unbacked)
        now = time.monotonic()
        for name, (uid, pool, size, when) in list(self._placed.items()):
            seen = volumes.get(name)
            stale = now - when > PLACED_GRACE_SECONDS
            if seen is None or seen.uid != uid or seen.status.node or stale:
                del self._placed[name]
            else:
                pending[pool] += size
        return pending

    def _volume_type(self, obj: Volume) -> VolumeType | None:
        name = obj.spec.volume_type
        vtype: VolumeType | None = self.op.store(VolumeType).lookup(name or DEFAULT_VOLUME_TYPE)
        if vtype is None and name is not None:
            raise Stall("VolumeTypeNotFound", f"volume type {name} does not exist")
        if vtype is not None:  # placement only: granted once, kept (as in Cinder)
            require_volume_type(self.op, vtype, obj.namespace or "")
        return vtype

    def _request(self, obj: Volume) -> VolumeRequest:
        vtype = self._volume_type(obj)
        request = VolumeRequest(
            size_gib=obj.spec.size_gib,
            zone=obj.spec.availability_zone,
            backend_name=vtype.spec.backend_name if vtype else None,
            extra_specs=dict(vtype.spec.extra_specs) if vtype else {},
        )
        src = obj.spec.source
        ns = obj.namespace or ""
        if src is None:
            return request
        if src.snapshot:
            snap = self._snapshot(ns, src.snapshot)
            _, pool = self._source_volume(ns, snap.spec.volume, f"origin of snapshot {snap.name}")
            self._fits(obj, snap.status.size_gib or 0, f"snapshot {snap.name}")
            return replace(request, only_pool=pool, source=f"snapshot {snap.name}")
        if src.volume:
            origin, pool = self._source_volume(ns, src.volume, "the clone source")
            if origin.uid == obj.uid:
                raise Stall("InvalidSource", f"volume {obj.name} cannot be a clone of itself")
            if not filled(origin):
                raise Wait("SourceNotReady", f"source volume {origin.name} is not created yet", 5)
            assert origin.status.backing is not None
            self._fits(obj, origin.status.backing.size_gib, f"volume {origin.name}")
            return replace(request, only_pool=pool, source=f"volume {origin.name}")
        if src.backup:
            backup = self._backup(ns, src.backup)
            self._fits(obj, backup.status.size_gib or 0, f"backup {backup.name}")
            return replace(request, only_node=backup.status.node, source=f"backup {backup.name}")
        if src.image:
            image = self._image(obj, src.image)
            need = math.ceil((image.status.virtual_size_bytes or 0) / GIB)
            self._fits(obj, max(need, image.spec.min_disk_gib), f"image {image.key}")
        return request

    def _fits(self, obj: Volume, need_gib: int, what: str) -> None:
        if obj.spec.size_gib < need_gib:
            raise Stall(
                "VolumeTooSmall",
                f"{what} needs {need_gib} GiB; volume {obj.name} asks for {obj.spec.size_gib} GiB",
            )

    def _snapshot(self, ns: str, name: str) -> VolumeSnapshot:
        snap: VolumeSnapshot | None = self.op.store(VolumeSnapshot).lookup(name, ns)
        if snap is None or snap.deleting:
            raise Wait("SnapshotNotFound", f"snapshot {name} does not exist", 10)
        if snap.status.size_gib is None or not snap.status.is_true("Ready"):
            raise Wait("SnapshotNotReady", f"snapshot {name} is not taken yet", 5)
        return snap

    def _source_volume(self, ns: str, name: str, what: str) -> tuple[Volume, tuple[str, str, str]]:
        vol: Volume | None = self.op.store(Volume).lookup(name, ns)
        if vol is None or vol.deleting:
            raise Wait("SourceVolumeNotFound", f"volume {name} ({what}) does not exist", 10)
        pool = _pool_of(vol)
        if pool is None:
            raise Wait("SourceNotReady", f"volume {name} ({what}) is not placed yet", 5)
        return vol, pool

    def _backup(self, ns: str, name: str) -> VolumeBackup:
        backup: VolumeBackup | None = self.op.store(VolumeBackup).lookup(name, ns)
        if backup is None or backup.deleting:
            raise Wait("BackupNotFound", f"backup {name} does not exist", 10)
        if not backup.status.is_true("Ready") or backup.status.node is None:
            raise Wait("BackupNotReady", f"backup {name} is not complete yet", 5)
        return backup

    def _image(self, obj: Volume, ref: ProjectRef) -> Image:
        ns = obj.namespace or ""
        image_ns = ref.namespace or ns
        image: Image | None = self.op.store(Image).lookup(ref.name, image_ns)
        if image is None or image.deleting:
            raise Wait("ImageNotFound", f"image {image_ns}/{ref.name} does not exist", 10)
        project = project_of_namespace(self.op, ns)
        if not visible(image, ns, project):
            raise Stall(
                "ImageNotVisible",
                f"image {image_ns}/{ref.name} is {image.spec.visibility} and not visible to"
                f" project {project}",
            )
        if image.status.is_true("Stalled"):
            cond = image.status.condition("Stalled")
            raise Stall(
                "ImageNotUsable",
                f"image {image_ns}/{ref.name} failed to import: {cond.message if cond else ''}",
            )
        if not image.status.is_true("Ready") or not image.status.sha256:
            raise Wait("WaitingForImage", f"image {image_ns}/{ref.name} is being imported", 5)
        return image

    def _bootable(self, obj: Volume) -> bool:
        """Bootable when asked, when filled from an image, or when the source is."""
        src = obj.spec.source
        if obj.spec.bootable or (src is not None and src.image is not None):
            return True
        ns = obj.namespace
        origin: Volume | None = None
        if src is not None and src.snapshot:
            snap = self.op.store(VolumeSnapshot).lookup(src.snapshot, ns)
            origin = self.op.store(Volume).lookup(snap.spec.volume, ns) if snap else None
        elif src is not None and src.volume:
            origin = self.op.store(Volume).lookup(src.volume, ns)
        if origin is None:
            return bool(obj.status.bootable)  # the source is gone: keep what it gave
        return bool(origin.status.bootable)

    # --- deletion ---------------------------------------------------------------------------

    async def finalize(self, obj: Volume) -> Outcome | None:
        attachment, _ = self._attachment(obj, grant=False)
        status = VolumeStatus(attachment=merged(obj.status.attachment, attachment))
        snaps = self.op.store(VolumeSnapshot).by_index("storage-volume", obj.key)
        if snaps:
            return Outcome.stalled(
                "HasSnapshots",
                f"volume {obj.name} has snapshots ({names(snaps)}); delete them first",
                status,
            )
        if attachment is not None:
            how = "boots from it" if attachment.boot else "has it attached"
            return Outcome.stalled(
                "InUse",
                f"instance {attachment.instance} {how}; detach volume {obj.name} first"
                " (remove it from the instance's spec)",
                status,
            )
        clones = self.op.store(Volume).by_index("storage-source", f"volume:{obj.key}")
        if clones:
            return Outcome.progressing(
                "SourceInUse",
                f"waiting for clones of volume {obj.name} to be copied: {names(clones)}",
                status,
                requeue_after=5,
            )
        reading = [
            b
            for b in self.op.store(VolumeBackup).by_index("storage-volume-uid", obj.uid)
            if not b.status.is_true("Ready") and not b.status.is_true("Stalled") and not b.deleting
        ]
        if reading:
            return Outcome.progressing(
                "BackupInProgress",
                f"waiting for backups of volume {obj.name} to finish: {names(reading)}",
                status,
                requeue_after=5,
            )
        return None


def _pool_of(vol: Volume) -> tuple[str, str, str] | None:
    s = vol.status
    if s.node and s.backend and s.pool:
        return (s.node, s.backend, s.pool)
    return None


def _instance_facts(inst: Instance | None) -> tuple[Any, ...] | None:
    if inst is None:
        return None
    return (
        tuple(v.volume for v in inst.spec.volumes),
        inst.spec.boot_volume.name if inst.spec.boot_volume else None,
        tuple(inst.status.attached_volumes),
        inst.status.node,
        inst.deleting,
    )
