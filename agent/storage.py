"""The node's block storage: cinder-volume and cinder-backup for this node.

Level-based, per object, through the drivers (all blocking work runs in the
storage thread pool, never on the event loop):

- Volume placed here (status.node): create it in its pool (blank, from an
  image through the node's image cache, from a snapshot, as a clone, or
  restored from a backup), grow it to spec.sizeGib while detached, export it
  with tgt (CHAP, credentials kept in a Secret in the components' namespace,
  see nubes.agent.chap_secrets) while status.attachment is set and remove
  the export when it goes. Reports status.backing and status.export.
- VolumeSnapshot / VolumeBackup placed here: take them, report their facts.
- Everything it creates carries AGENT_FINALIZER; once the controller has
  dropped its own finalizer (deletion allowed), the agent removes the export,
  wipes the data and drops its finalizer.
- Pool statistics go into this node's Hypervisor status through the
  HypervisorReporter (`report()`), refreshed after changes.

Failures are reported in status.nodeProblem (reason, message, whether the
agent retries by itself, the node); the controller turns them into conditions.

The node work is the storage node driver's verbs (nubes.drivers.volumes.node).
After a restart everything is re-adopted: the drivers read their state back
and every verb is idempotent.

About 520 lines: the three storage reconcilers share the failure reporting
and hold-off machinery of _StorageAgent, kept with them in one module.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from nubes.agent.chap_secrets import ChapSecrets
from nubes.agent.config import AgentConfig
from nubes.agent.image_source import source_of
from nubes.agent.problems import node_problem
from nubes.api.compute import Hypervisor, HypervisorStatus, StoragePool
from nubes.api.image import Image
from nubes.api.storage import (
    AGENT_FINALIZER,
    BACKUP_FINALIZER,
    SNAPSHOT_FINALIZER,
    VOLUME_FINALIZER,
    Volume,
    VolumeBacking,
    VolumeBackup,
    VolumeBackupStatus,
    VolumeExport,
    VolumeSnapshot,
    VolumeSnapshotStatus,
    VolumeStatus,
)
from nubes.drivers.backup.posix import PosixBackupStore
from nubes.drivers.backup.workflow import backup_volume, temporary_snapshot_id
from nubes.drivers.images.cache import ImageCache
from nubes.drivers.iscsi.tgt import TgtExporter
from nubes.drivers.problem import Failure, Problem, fail, problem_of
from nubes.drivers.runner import Runner, SubprocessRunner
from nubes.drivers.volumes.base import PoolStats, StorageError
from nubes.drivers.volumes.node import (
    BackendSpec,
    FillSource,
    StorageNode,
    build_backends,
    is_loopback,
    parse_portal,
)
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

log = structlog.get_logger()

T = TypeVar("T")
AgentStatus = VolumeStatus | VolumeSnapshotStatus | VolumeBackupStatus

# Attached volumes are re-checked this often (tgtd keeps exports in memory only).
EXPORT_RECHECK_SECONDS = 60.0
# A failure the agent does not retry by itself is retried after this anyway.
STUCK_RETRY_SECONDS = 600.0


# --- configuration ------------------------------------------------------------------


def pool_report(stats: PoolStats) -> dict[str, Any]:
    """A pool as Hypervisor status.storagePools shows it (Cinder's volume stats)."""
    caps = stats.capabilities
    return StoragePool(
        backend=stats.backend_name,
        pool=stats.pool_name,
        total_gib=math.floor(stats.total_gib),
        free_gib=math.floor(stats.free_gib),
        provisioned_gib=math.ceil(stats.provisioned_gib),
        max_over_subscription_ratio=float(caps.get("max_over_subscription_ratio", 1.0)),
        capabilities={k: str(v) for k, v in sorted(caps.items())},
    ).wire()


# --- failures -------------------------------------------------------------------------


def classify(error: BaseException, what: str) -> Problem:
    """A driver error as a report: reason, message naming `what`, retried or
    not (each driver error class carries its reason, see nubes.drivers.problem)."""
    return problem_of(error, what)


# --- the node's storage -----------------------------------------------------------------


class NodeStorage:
    def __init__(self, config: AgentConfig, runner: Runner | None = None) -> None:
        self.node = config.node
        self.secret_namespace = config.secret_namespace
        self.runner = runner or SubprocessRunner()
        specs = [BackendSpec.parse(t) for t in config.volume_backends] or [
            BackendSpec("file", "file", os.path.join(config.state_dir, "volumes"))
        ]
        host, port = parse_portal(config.iscsi_portal)
        self.portal = f"{host}:{port}"
        self.loopback_portal = is_loopback(host)
        # The node's verbs: volumes, exports, backups (blocking, in `executor`).
        self.disks = StorageNode(
            build_backends(self.runner, specs),
            TgtExporter(self.runner, portal_host=host, portal_port=port),
            PosixBackupStore(config.backup_store or os.path.join(config.state_dir, "backups")),
            ImageCache(os.path.join(config.state_dir, "volume-images"), self.runner),
            Path(config.state_dir) / "storage" / "filling",
        )
        self.image_store = Path(config.image_store)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="storage")
        self._pools: list[dict[str, Any]] = []
        self.export_checked: set[str] = set()
        log.info(
            "node storage",
            node=self.node,
            pools=[f"{b.backend_name}/{b.pool_name}" for b in self.disks.backends],
            portal=self.portal,
            backups=str(self.disks.backups.root),
        )

    # --- wiring -------------------------------------------------------------------

    def register(self, op: Operator) -> None:
        self.op = op
        self.chap = ChapSecrets(op, self.secret_namespace, self.node)
        op.store(Image)
        op.store(Hypervisor)
        op.register(VolumeAgent(self))
        op.register(SnapshotAgent(self))
        op.register(BackupAgent(self))
        op.on_start(self.start)
        op.loop(
            "storage-pools",
            self.refresh_pools,
            [Volume, VolumeSnapshot, VolumeBackup],
            resync=30.0,
            debounce=0.5,
        )
        op.every(60.0, self.prune)

    def report(self) -> dict[str, Any]:
        """This node's storage facts for its Hypervisor status."""
        pools = [StoragePool.model_validate(p) for p in self._pools]
        return HypervisorStatus(storage_pools=pools, iscsi_portal=self.portal).patch()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def start(self) -> None:
        await self.run(self.disks.finish_interrupted_work)
        await self.refresh_pools(True)

    async def refresh_pools(self, full: bool) -> None:
        pools = [pool_report(p) for p in await self.run(self.disks.pool_stats)]
        if pools != self._pools:
            self._pools = pools
            self.op.enqueue(Hypervisor, self.node)

    async def prune(self) -> None:
        """Level-based clean-ups: exports of volumes of this node's pools that
        nothing wants exported (a missed event, objects gone), image bases no
        creation needs."""
        wanted = {
            v.uid
            for v in self.op.store(Volume)
            if v.status.node == self.node and v.status.attachment is not None
        }
        try:
            removed = await self.run(self.disks.prune_exports, wanted)
        except (StorageError, OSError) as e:
            log.warning("export clean-up failed", error=str(e))
            return
        if removed:
            log.info("removed stale exports", volumes=removed)
        await self.run(functools.partial(self.disks.images.prune, [], min_unused_seconds=3600.0))

    # --- exports ---------------------------------------------------------------------------

    def initiators(self, attachment_node: str | None) -> list[str]:
        """The target's ACL: the attached node's address when known and
        reachable (not a loopback portal); CHAP is required either way."""
        if self.loopback_portal or attachment_node is None:
            return ["ALL"]
        hv: Hypervisor | None = self.op.store(Hypervisor).lookup(attachment_node)
        address = hv.status.host_ip if hv is not None else None
        return [address] if address else ["ALL"]


# --- reconcilers ---------------------------------------------------------------------------


class _StorageAgent(Reconciler[Any]):
    finalizer = AGENT_FINALIZER
    controller_finalizer = ""

    def __init__(self, storage: NodeStorage) -> None:
        self.storage = storage
        self._failures: dict[str, int] = {}
        self._stuck: dict[str, tuple[tuple[Any, ...], float]] = {}
        """uid -> (facts, when) of failures the agent does not retry by
        itself: not repeated on every event, only when the facts change (or
        after STUCK_RETRY_SECONDS, or after a restart)."""

    def accepts(self, obj: Any) -> bool:
        node: str | None = obj.status.node
        return node == self.storage.node

    def released(self, obj: Any) -> bool:
        """The controller has allowed the deletion (its finalizer is gone)."""
        return self.controller_finalizer not in obj.metadata.finalizers

    def facts(self, obj: Any) -> tuple[Any, ...]:
        """What must change for a failure that waits for a change to be retried."""
        return (obj.generation,)

    def holding_off(self, obj: Any) -> Outcome | None:
        """While a failure waits for a change, leave the object alone."""
        stuck = self._stuck.get(obj.uid)
        if stuck is None:
            return None
        facts, since = stuck
        waited = time.monotonic() - since
        if facts != self.facts(obj) or waited >= STUCK_RETRY_SECONDS:
            del self._stuck[obj.uid]
            return None
        return Outcome.observed({}, requeue_after=STUCK_RETRY_SECONDS - waited)

    def failed(self, obj: Any, problem: Problem, status: AgentStatus | None = None) -> Outcome:
        """Report a failure; retry with backoff (or much later when the agent
        waits for a change)."""
        failures = self._failures.get(obj.uid, 0) + 1
        self._failures[obj.uid] = failures
        if not problem.retryable:
            self._stuck[obj.uid] = (self.facts(obj), time.monotonic())
        delay = min(60.0, 2.0 * 2 ** min(failures, 5)) if problem.retryable else STUCK_RETRY_SECONDS
        log.warning(
            "storage operation failed",
            kind=obj.crd.kind,
            key=obj.key,
            reason=problem.reason,
            error=problem.message,
            retry_in=delay,
        )
        status = status or type(obj.status)()
        status.node_problem = node_problem(problem, self.storage.node)
        return Outcome.observed(status.patch(), requeue_after=delay)

    def succeeded(self, obj: Any, status: AgentStatus, **kw: Any) -> Outcome:
        self._failures.pop(obj.uid, None)
        self._stuck.pop(obj.uid, None)
        status.node_problem = None
        return Outcome.observed(status.patch(), **kw)

    async def finalize(self, obj: Any) -> Outcome | None:
        if not self.released(obj):
            return Outcome.observed({}, requeue_after=30)
        try:
            await self.remove(obj)
        except (Failure, OSError) as e:
            what = f"deleting {obj.crd.kind} {obj.name}"
            return self.failed(obj, classify(e, what))
        self._failures.pop(obj.uid, None)
        self._stuck.pop(obj.uid, None)
        log.info("removed from node", kind=obj.crd.kind, key=obj.key, node=self.storage.node)
        return None

    async def remove(self, obj: Any) -> None:
        """Delete what this node holds of the object (idempotent)."""
        raise NotImplementedError


def granted_size(obj: Volume) -> int:
    """The size to create or extend to: the spec's, up to what the project's
    quota granted (an extend over quota waits in the controller)."""
    granted = obj.status.granted_size_gib
    return obj.spec.size_gib if granted is None else min(obj.spec.size_gib, granted)


class VolumeAgent(_StorageAgent):
    kind = Volume
    workers = 8
    controller_finalizer = VOLUME_FINALIZER

    def facts(self, obj: Volume) -> tuple[Any, ...]:
        attachment = obj.status.attachment
        return (obj.generation, attachment.wire() if attachment else None)

    def source(self, vol: Volume) -> FillSource | None:
        """Resolve the source to backend ids (from the watch caches)."""
        src = vol.spec.source
        ns = vol.namespace
        if src is None:
            return None
        if src.snapshot:
            snap = self.op.store(VolumeSnapshot).lookup(src.snapshot, ns)
            if snap is None:
                raise fail("SourceMissing", f"snapshot {src.snapshot} does not exist")
            return FillSource("snapshot", snap.uid, described=f"snapshot {src.snapshot}")
        if src.volume:
            origin = self.op.store(Volume).lookup(src.volume, ns)
            if origin is None:
                raise fail("SourceMissing", f"volume {src.volume} does not exist")
            return FillSource("volume", origin.uid, described=f"volume {src.volume}")
        if src.backup:
            backup = self.op.store(VolumeBackup).lookup(src.backup, ns)
            if backup is None:
                raise fail("SourceMissing", f"backup {src.backup} does not exist")
            return FillSource("backup", backup.uid, described=f"backup {ns}/{src.backup}")
        assert src.image is not None
        image_ns = src.image.namespace or ns
        image: Image | None = self.op.store(Image).lookup(src.image.name, image_ns)
        source = source_of(image, self.storage.image_store) if image is not None else None
        if image is None or source is None:
            raise fail("ImageNotReady", f"image {image_ns}/{src.image.name} is not imported")
        return FillSource(
            "image",
            source.sha256,
            source,
            described=f"image {image_ns}/{src.image.name}",
        )

    async def converge(self, obj: Volume) -> Outcome:
        if (later := self.holding_off(obj)) is not None:
            return later
        s = self.storage
        backend = s.disks.backend(obj.status.backend, obj.status.pool)
        if backend is None:
            problem = Problem(
                "PoolNotServed",
                f"node {s.node} serves no pool {obj.status.backend}/{obj.status.pool}",
                retryable=False,
            )
            return self.failed(obj, problem)
        uid = obj.uid
        status = VolumeStatus()
        try:
            info = await s.run(backend.get_volume, uid)
            if info is None or await s.run(s.disks.marker(uid).exists):
                what = f"creating volume {obj.name}"
                try:
                    source = self.source(obj)
                    if source is not None:
                        what = f"filling volume {obj.name} from {source.described}"
                    info = await s.run(
                        s.disks.ensure_volume, backend, uid, granted_size(obj), source
                    )
                except (Failure, OSError) as e:
                    # What is there (if anything) does not hold the source's data.
                    left = await s.run(backend.get_volume, uid)
                    status.backing = (
                        VolumeBacking(node=s.node, size_gib=left.size_gib, source_done=False)
                        if left is not None
                        else None
                    )
                    return self.failed(obj, classify(e, what), status)
            status.backing = VolumeBacking(node=s.node, size_gib=info.size_gib, source_done=True)
            attachment = obj.status.attachment
            if attachment is None:
                if obj.status.export is not None or uid not in s.export_checked:
                    await s.run(s.disks.unexport, uid)
                    s.export_checked.add(uid)
                status.export = None
                if info.size_gib < granted_size(obj):
                    info = await s.run(s.disks.extend, backend, uid, granted_size(obj))
                    status.backing.size_gib = info.size_gib
                return self.succeeded(obj, status)
            secret, creds = await s.chap.ensure(obj)
            conn = await s.run(s.disks.export, uid, info.path, creds, s.initiators(attachment.node))
            s.export_checked.add(uid)
            # Every field set: a field the last export had and this one lacks
            # goes as null in the merge patch.
            status.export = VolumeExport(
                portal=conn.portal,
                iqn=conn.iqn,
                lun=conn.lun,
                chap_secret=secret,
                initiator_node=attachment.node,
            )
            return self.succeeded(obj, status, requeue_after=EXPORT_RECHECK_SECONDS)
        except (Failure, OSError, ApiError) as e:
            if isinstance(e, ApiError) and e.conflict:
                raise
            return self.failed(obj, classify(e, f"volume {obj.name}"), status)

    async def remove(self, obj: Volume) -> None:
        s = self.storage
        backend = s.disks.backend(obj.status.backend, obj.status.pool)
        await s.run(s.disks.delete_volume, obj.uid, backend)
        s.export_checked.discard(obj.uid)
        await s.chap.delete(obj)


class SnapshotAgent(_StorageAgent):
    kind = VolumeSnapshot
    workers = 4
    controller_finalizer = SNAPSHOT_FINALIZER

    async def converge(self, obj: VolumeSnapshot) -> Outcome:
        if (later := self.holding_off(obj)) is not None:
            return later
        s = self.storage
        try:
            found = await s.run(s.disks.find_snapshot, obj.uid)
            if found is None:
                if obj.status.size_gib is not None:
                    raise fail(
                        "SnapshotLost",
                        f"snapshot {obj.name} is gone from node {s.node}",
                        retryable=False,
                    )
                vol = self.op.store(Volume).lookup(obj.spec.volume, obj.namespace)
                if vol is None:
                    raise fail("SourceMissing", f"volume {obj.spec.volume} does not exist")
                backend = s.disks.backend(vol.status.backend, vol.status.pool)
                if backend is None:
                    raise fail(
                        "PoolNotServed",
                        f"volume {vol.name} is in no pool of this node",
                        retryable=False,
                    )
                found = await s.run(backend.create_snapshot, obj.uid, vol.uid)
            return self.succeeded(obj, VolumeSnapshotStatus(size_gib=found.size_gib))
        except (Failure, OSError) as e:
            return self.failed(obj, classify(e, f"snapshot {obj.name}"))

    async def remove(self, obj: VolumeSnapshot) -> None:
        await self.storage.run(self.storage.disks.delete_snapshot, obj.uid)


class BackupAgent(_StorageAgent):
    kind = VolumeBackup
    workers = 2
    controller_finalizer = BACKUP_FINALIZER

    async def converge(self, obj: VolumeBackup) -> Outcome:
        if (later := self.holding_off(obj)) is not None:
            return later
        s = self.storage
        volume_uid = obj.status.volume_uid
        if volume_uid is None:
            return Outcome.observed({})
        try:
            info = await s.run(s.disks.backups.get_backup, obj.uid)
            if info is None:
                parent_id = None
                if obj.status.parent:
                    parent = self.op.store(VolumeBackup).lookup(obj.status.parent, obj.namespace)
                    if parent is None:
                        raise fail(
                            "ParentMissing", f"parent backup {obj.status.parent} does not exist"
                        )
                    parent_id = parent.uid
                backend = await s.run(s.disks.holding, volume_uid)
                if backend is None:
                    raise fail(
                        "SourceMissing",
                        f"volume {obj.spec.volume} ({volume_uid}) is not on node {s.node}",
                        retryable=False,
                    )
                info = await s.run(
                    functools.partial(
                        backup_volume,
                        backend,
                        s.disks.backups,
                        backup_id=obj.uid,
                        volume_id=volume_uid,
                        parent_id=parent_id,
                    )
                )
            status = VolumeBackupStatus(
                size_gib=math.ceil(info.size_bytes / 1024**3),
                container=info.container,
                chunks=info.chunks,
                chunks_stored=info.chunks_stored,
                stored_bytes=info.stored_bytes,
            )
            return self.succeeded(obj, status)
        except (Failure, OSError) as e:
            return self.failed(obj, classify(e, f"backup {obj.name}"))

    async def remove(self, obj: VolumeBackup) -> None:
        s = self.storage
        await s.run(s.disks.backups.delete_backup, obj.uid)
        # A temporary snapshot an interrupted backup left behind.
        await s.run(s.disks.delete_snapshot, temporary_snapshot_id(obj.uid))
