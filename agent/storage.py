"""The node's block storage: cinder-volume and cinder-backup for this node.

Level-based, per object, through the drivers (all blocking work runs in the
storage thread pool, never on the event loop):

- Volume placed here (status.node): create it in its pool (blank, from an
  image through the node's image cache, from a snapshot, as a clone, or
  restored from a backup), grow it to spec.sizeGib while detached, export it
  with tgt (CHAP, credentials kept in a Secret in the components' namespace) while
  status.attachment is set and remove the export when it goes. Reports
  status.backing and status.export.
- VolumeSnapshot / VolumeBackup placed here: take them, report their facts.
- Everything it creates carries AGENT_FINALIZER; once the controller has
  dropped its own finalizer (deletion allowed), the agent removes the export,
  wipes the data and drops its finalizer.
- Pool statistics go into this node's Hypervisor status through the
  HypervisorReporter (`report()`), refreshed after changes.

Failures are reported in status.nodeProblem (reason, message, whether the
agent retries by itself, the node); the controller turns them into conditions.

Initial contents that are written into an existing volume (image, backup)
are bracketed by a marker file, so that a volume whose copy was interrupted
(crash, corrupt backup) is never reported filled; it is filled again.
After a restart everything is re-adopted: the drivers read their state back
and every verb is idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from nubes.agent.config import NODE_LABEL, AgentConfig
from nubes.agent.image_source import source_of
from nubes.agent.problems import node_problem
from nubes.api.compute import Hypervisor
from nubes.api.image import Image
from nubes.api.meta import ApiModel
from nubes.api.storage import (
    AGENT_FINALIZER,
    BACKUP_FINALIZER,
    SNAPSHOT_FINALIZER,
    VOLUME_FINALIZER,
    Volume,
    VolumeBackup,
    VolumeSnapshot,
)
from nubes.drivers.backup.posix import PosixBackupStore
from nubes.drivers.backup.workflow import (
    backup_volume,
    restore_to_new_volume,
    temporary_snapshot_id,
)
from nubes.drivers.images.cache import (
    ImageCache,
    ImageSource,
)
from nubes.drivers.iscsi.connection import ChapCredentials
from nubes.drivers.iscsi.tgt import TgtExporter
from nubes.drivers.problem import Failure, Problem, fail, problem_of
from nubes.drivers.runner import Runner, SubprocessRunner
from nubes.drivers.volumes.base import (
    ImageImport,
    PoolStats,
    StorageError,
    VolumeBackend,
    VolumeInfo,
)
from nubes.drivers.volumes.file import FileBackend
from nubes.drivers.volumes.lvm import LvmBackend, detect_lvm
from nubes.runtime.kube import SECRETS, ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

log = structlog.get_logger()

T = TypeVar("T")

SECRET_TYPE = "storage.nubes.io/iscsi-chap"
VOLUME_LABEL = "storage.nubes.io/volume"
VOLUME_UID_LABEL = "storage.nubes.io/volume-uid"
NAMESPACE_LABEL = "storage.nubes.io/namespace"
# Attached volumes are re-checked this often (tgtd keeps exports in memory only).
EXPORT_RECHECK_SECONDS = 60.0
# A failure the agent does not retry by itself is retried after this anyway.
STUCK_RETRY_SECONDS = 600.0


def chap_secret_name(volume_uid: str) -> str:
    """The Secret holding a volume's CHAP credentials. It lives in the
    components' namespace, where volumes of every project meet: named by uid."""
    return f"iscsi-chap-{volume_uid}"


# --- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    name: str
    driver: str
    location: str
    """Directory (file) or VG[/THINPOOL] (lvm)."""

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        parts = text.split(":", 2)
        if len(parts) != 3 or parts[1] not in ("file", "lvm") or not parts[0] or not parts[2]:
            raise ValueError(f"expected NAME:file:DIR or NAME:lvm:VG[/THINPOOL], got {text!r}")
        return cls(parts[0], parts[1], parts[2])


def build_backends(runner: Runner, specs: list[BackendSpec]) -> list[VolumeBackend]:
    backends: list[VolumeBackend] = []
    for spec in specs:
        if spec.driver == "file":
            backends.append(FileBackend(runner, spec.location, backend_name=spec.name))
            continue
        support = detect_lvm(runner)
        if not support.usable:
            log.warning("lvm backend not served", backend=spec.name, reason=support.reason)
            continue
        vg, _, thin = spec.location.partition("/")
        backends.append(LvmBackend(runner, vg, thin_pool=thin or None, backend_name=spec.name))
    return backends


def pool_report(stats: PoolStats) -> dict[str, Any]:
    """A pool as Hypervisor status.storagePools shows it (Cinder's volume stats)."""
    caps = stats.capabilities
    return {
        "backend": stats.backend_name,
        "pool": stats.pool_name,
        "totalGib": math.floor(stats.total_gib),
        "freeGib": math.floor(stats.free_gib),
        "provisionedGib": math.ceil(stats.provisioned_gib),
        "maxOverSubscriptionRatio": float(caps.get("max_over_subscription_ratio", 1.0)),
        "capabilities": {k: str(v) for k, v in sorted(caps.items())},
    }


# --- failures -------------------------------------------------------------------------


def classify(error: BaseException, what: str) -> Problem:
    """A driver error as a report: reason, message naming `what`, retried or
    not (each driver error class carries its reason, see nubes.drivers.problem)."""
    return problem_of(error, what)


# --- the node's storage -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What a new volume is filled from, resolved to backend ids."""

    kind: str  # "snapshot", "volume", "backup", "image"
    ident: str
    """Snapshot, volume or backup uid; image sha256."""
    image: ImageSource | None = None
    described: str = ""


class NodeStorage:
    def __init__(self, config: AgentConfig, runner: Runner | None = None) -> None:
        self.node = config.node
        self.secret_namespace = config.secret_namespace
        self.runner = runner or SubprocessRunner()
        specs = [BackendSpec.parse(t) for t in config.volume_backends] or [
            BackendSpec("file", "file", os.path.join(config.state_dir, "volumes"))
        ]
        self.backends = build_backends(self.runner, specs)
        host, port = parse_portal(config.iscsi_portal)
        self.portal = f"{host}:{port}"
        self.loopback_portal = _is_loopback(host)
        self.exporter = TgtExporter(self.runner, portal_host=host, portal_port=port)
        self.backups = PosixBackupStore(
            config.backup_store or os.path.join(config.state_dir, "backups")
        )
        self.images = ImageCache(os.path.join(config.state_dir, "volume-images"), self.runner)
        self.image_store = Path(config.image_store)
        self.markers = Path(config.state_dir) / "storage" / "filling"
        self.markers.mkdir(parents=True, exist_ok=True)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="storage")
        self._pools: list[dict[str, Any]] = []
        self.export_checked: set[str] = set()
        log.info(
            "node storage",
            node=self.node,
            pools=[f"{b.backend_name}/{b.pool_name}" for b in self.backends],
            portal=self.portal,
            backups=str(self.backups.root),
        )

    # --- wiring -------------------------------------------------------------------

    def register(self, op: Operator) -> None:
        self.op = op
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
        return {"storagePools": self._pools, "iscsiPortal": self.portal}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def start(self) -> None:
        for backend in self.backends:
            if isinstance(backend, FileBackend):
                await self.run(backend.finish_interrupted_work)
        await self.refresh_pools(True)

    async def refresh_pools(self, full: bool) -> None:
        pools = await self.run(lambda: [pool_report(b.pool_stats()) for b in self.backends])
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
            removed = await self.run(self._prune_exports, wanted)
        except (StorageError, OSError) as e:
            log.warning("export clean-up failed", error=str(e))
            return
        if removed:
            log.info("removed stale exports", volumes=removed)
        await self.run(functools.partial(self.images.prune, [], min_unused_seconds=3600.0))

    def _prune_exports(self, wanted: set[str]) -> list[str]:
        mine = {v.id for b in self.backends for v in b.list_volumes()}
        if not mine - wanted:
            return []  # nothing here could be exported by mistake: leave tgtd alone
        return self.exporter.remove_exports_of(mine - wanted)

    # --- lookups ------------------------------------------------------------------------

    def backend(self, name: str | None, pool: str | None) -> VolumeBackend | None:
        return next(
            (b for b in self.backends if b.backend_name == name and b.pool_name == pool), None
        )

    def holding(self, volume_id: str) -> VolumeBackend | None:
        """The backend holding a volume, wherever it is (blocking)."""
        return next((b for b in self.backends if b.get_volume(volume_id) is not None), None)

    def marker(self, volume_id: str) -> Path:
        return self.markers / volume_id

    # --- volumes (blocking: run in the pool) ---------------------------------------------

    def ensure_volume(
        self, backend: VolumeBackend, volume_id: str, size_gib: int, source: Source | None
    ) -> VolumeInfo:
        marker = self.marker(volume_id)
        info = backend.get_volume(volume_id)
        if info is not None and not marker.exists():
            return info
        if source is None:
            return backend.create_volume(volume_id, size_gib)
        if source.kind == "snapshot":
            return backend.create_volume_from_snapshot(volume_id, source.ident, size_gib)
        if source.kind == "volume":
            return backend.clone_volume(volume_id, source.ident, size_gib)
        _touch_durably(marker)
        if source.kind == "backup":
            info, _ = restore_to_new_volume(
                backend,
                self.backups,
                backup_id=source.ident,
                volume_id=volume_id,
                size_gib=size_gib,
            )
        else:
            assert source.image is not None
            if not isinstance(backend, ImageImport):
                raise fail(
                    "ImageImportUnsupported",
                    f"backend {backend.backend_name} cannot copy images into volumes",
                    retryable=False,
                )
            cached = self.images.ensure_image(source.image)
            backend.create_volume(volume_id, size_gib)
            info = backend.copy_image_to_volume(volume_id, cached.path, "raw")
        marker.unlink()
        log.info("volume filled", volume=volume_id, source=source.described)
        return info

    def extend(self, backend: VolumeBackend, volume_id: str, size_gib: int) -> VolumeInfo:
        self.exporter.remove_export(volume_id)  # never grow under an exporter
        return backend.extend_volume(volume_id, size_gib)

    def delete_volume(self, volume_id: str, backend: VolumeBackend | None) -> None:
        self.exporter.remove_export(volume_id)
        self.export_checked.discard(volume_id)
        where = backend if backend is not None and backend.get_volume(volume_id) else None
        target = where or self.holding(volume_id)
        if target is not None:
            target.delete_volume(volume_id)
        self.marker(volume_id).unlink(missing_ok=True)

    # --- exports ---------------------------------------------------------------------------

    def initiators(self, attachment_node: str | None) -> list[str]:
        """The target's ACL: the attached node's address when known and
        reachable (not a loopback portal); CHAP is required either way."""
        if self.loopback_portal or attachment_node is None:
            return ["ALL"]
        hv: Hypervisor | None = self.op.store(Hypervisor).lookup(attachment_node)
        address = hv.status.host_ip if hv is not None else None
        return [address] if address else ["ALL"]

    async def chap(self, vol: Volume) -> tuple[str, ChapCredentials]:
        """The volume's CHAP credentials: generated once, kept in a Secret in
        the components' namespace (tenants, even project admins, never read
        it), labelled with the volume and this node; removed with the volume."""
        name = chap_secret_name(vol.uid)
        kube, namespace = self.op.kube, self.secret_namespace
        for _ in range(3):
            raw = await kube.get_raw(SECRETS, name, namespace)
            if raw is not None:
                labels = raw.get("metadata", {}).get("labels") or {}
                if labels.get(VOLUME_UID_LABEL) != vol.uid:
                    raise fail(
                        "ChapSecretNameTaken",
                        f"Secret {namespace}/{name} exists and does not belong to volume"
                        f" {vol.name}",
                        retryable=False,
                    )
                data = raw.get("data") or {}
                return name, ChapCredentials(
                    username=base64.b64decode(data.get("username", "")).decode(),
                    password=base64.b64decode(data.get("password", "")).decode(),
                )
            creds = ChapCredentials.generate(vol.uid)
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": SECRET_TYPE,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        VOLUME_LABEL: vol.name[:63].rstrip("-_."),
                        VOLUME_UID_LABEL: vol.uid,
                        NAMESPACE_LABEL: vol.namespace or "",
                        NODE_LABEL: self.node,
                    },
                },
                "stringData": {"username": creds.username, "password": creds.password},
            }
            try:
                await kube.create_raw(SECRETS, body, namespace)
            except ApiError as e:
                if e.conflict:
                    continue  # made meanwhile: read it back
                raise
            log.info("chap secret created", volume=vol.key, secret=f"{namespace}/{name}")
            return name, creds
        raise fail("ChapSecretConflict", f"could not settle Secret {namespace}/{name}")

    async def delete_chap(self, vol: Volume) -> None:
        name, namespace = chap_secret_name(vol.uid), self.secret_namespace
        raw = await self.op.kube.get_raw(SECRETS, name, namespace)
        if raw is None:
            return
        labels = raw.get("metadata", {}).get("labels") or {}
        if labels.get(VOLUME_UID_LABEL) == vol.uid:
            await self.op.kube.delete_raw(SECRETS, name, namespace, uid=raw["metadata"].get("uid"))


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

    def failed(self, obj: Any, problem: Problem, status: dict[str, Any]) -> Outcome:
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
        status["nodeProblem"] = node_problem(problem, self.storage.node)
        return Outcome.observed(status, requeue_after=delay)

    def succeeded(self, obj: Any, status: dict[str, Any], **kw: Any) -> Outcome:
        self._failures.pop(obj.uid, None)
        self._stuck.pop(obj.uid, None)
        status["nodeProblem"] = None
        return Outcome.observed(status, **kw)

    async def finalize(self, obj: Any) -> Outcome | None:
        if not self.released(obj):
            return Outcome.observed({}, requeue_after=30)
        try:
            await self.remove(obj)
        except (Failure, OSError) as e:
            what = f"deleting {obj.crd.kind} {obj.name}"
            return self.failed(obj, classify(e, what), {})
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

    def source(self, vol: Volume) -> Source | None:
        """Resolve the source to backend ids (from the watch caches)."""
        src = vol.spec.source
        ns = vol.namespace
        if src is None:
            return None
        if src.snapshot:
            snap = self.op.store(VolumeSnapshot).lookup(src.snapshot, ns)
            if snap is None:
                raise fail("SourceMissing", f"snapshot {src.snapshot} does not exist")
            return Source("snapshot", snap.uid, described=f"snapshot {src.snapshot}")
        if src.volume:
            origin = self.op.store(Volume).lookup(src.volume, ns)
            if origin is None:
                raise fail("SourceMissing", f"volume {src.volume} does not exist")
            return Source("volume", origin.uid, described=f"volume {src.volume}")
        if src.backup:
            backup = self.op.store(VolumeBackup).lookup(src.backup, ns)
            if backup is None:
                raise fail("SourceMissing", f"backup {src.backup} does not exist")
            return Source("backup", backup.uid, described=f"backup {ns}/{src.backup}")
        assert src.image is not None
        image_ns = src.image.namespace or ns
        image: Image | None = self.op.store(Image).lookup(src.image.name, image_ns)
        source = source_of(image, self.storage.image_store) if image is not None else None
        if image is None or source is None:
            raise fail("ImageNotReady", f"image {image_ns}/{src.image.name} is not imported")
        return Source(
            "image",
            source.sha256,
            source,
            described=f"image {image_ns}/{src.image.name}",
        )

    async def converge(self, obj: Volume) -> Outcome:
        if (later := self.holding_off(obj)) is not None:
            return later
        s = self.storage
        backend = s.backend(obj.status.backend, obj.status.pool)
        if backend is None:
            problem = Problem(
                "PoolNotServed",
                f"node {s.node} serves no pool {obj.status.backend}/{obj.status.pool}",
                retryable=False,
            )
            return self.failed(obj, problem, {})
        uid = obj.uid
        status: dict[str, Any] = {}
        try:
            info = await s.run(backend.get_volume, uid)
            if info is None or await s.run(s.marker(uid).exists):
                what = f"creating volume {obj.name}"
                try:
                    source = self.source(obj)
                    if source is not None:
                        what = f"filling volume {obj.name} from {source.described}"
                    info = await s.run(s.ensure_volume, backend, uid, granted_size(obj), source)
                except (Failure, OSError) as e:
                    # What is there (if anything) does not hold the source's data.
                    left = await s.run(backend.get_volume, uid)
                    status["backing"] = (
                        {"node": s.node, "sizeGib": left.size_gib, "sourceDone": False}
                        if left is not None
                        else None
                    )
                    return self.failed(obj, classify(e, what), status)
            status["backing"] = {"node": s.node, "sizeGib": info.size_gib, "sourceDone": True}
            attachment = obj.status.attachment
            if attachment is None:
                if obj.status.export is not None or uid not in s.export_checked:
                    await s.run(s.exporter.remove_export, uid)
                    s.export_checked.add(uid)
                status["export"] = None
                if info.size_gib < granted_size(obj):
                    info = await s.run(s.extend, backend, uid, granted_size(obj))
                    status["backing"]["sizeGib"] = info.size_gib
                return self.succeeded(obj, status)
            secret, creds = await s.chap(obj)
            conn = await s.run(
                functools.partial(
                    s.exporter.ensure_export,
                    uid,
                    info.path,
                    chap=creds,
                    initiators=s.initiators(attachment.node),
                )
            )
            s.export_checked.add(uid)
            export = {
                "portal": conn.portal,
                "iqn": conn.iqn,
                "lun": conn.lun,
                "chapSecret": secret,
                "initiatorNode": attachment.node,
            }
            status["export"] = merged(obj.status.export, export)
            return self.succeeded(obj, status, requeue_after=EXPORT_RECHECK_SECONDS)
        except (Failure, OSError, ApiError) as e:
            if isinstance(e, ApiError) and e.conflict:
                raise
            return self.failed(obj, classify(e, f"volume {obj.name}"), status)

    async def remove(self, obj: Volume) -> None:
        s = self.storage
        await s.run(s.delete_volume, obj.uid, s.backend(obj.status.backend, obj.status.pool))
        await s.delete_chap(obj)


class SnapshotAgent(_StorageAgent):
    kind = VolumeSnapshot
    workers = 4
    controller_finalizer = SNAPSHOT_FINALIZER

    async def converge(self, obj: VolumeSnapshot) -> Outcome:
        if (later := self.holding_off(obj)) is not None:
            return later
        s = self.storage
        try:
            found = await s.run(_find_snapshot, s.backends, obj.uid)
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
                backend = s.backend(vol.status.backend, vol.status.pool)
                if backend is None:
                    raise fail(
                        "PoolNotServed",
                        f"volume {vol.name} is in no pool of this node",
                        retryable=False,
                    )
                found = await s.run(backend.create_snapshot, obj.uid, vol.uid)
            return self.succeeded(obj, {"sizeGib": found.size_gib})
        except (Failure, OSError) as e:
            return self.failed(obj, classify(e, f"snapshot {obj.name}"), {})

    async def remove(self, obj: VolumeSnapshot) -> None:
        await self.storage.run(_delete_snapshot, self.storage.backends, obj.uid)


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
            info = await s.run(s.backups.get_backup, obj.uid)
            if info is None:
                parent_id = None
                if obj.status.parent:
                    parent = self.op.store(VolumeBackup).lookup(obj.status.parent, obj.namespace)
                    if parent is None:
                        raise fail(
                            "ParentMissing", f"parent backup {obj.status.parent} does not exist"
                        )
                    parent_id = parent.uid
                backend = await s.run(s.holding, volume_uid)
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
                        s.backups,
                        backup_id=obj.uid,
                        volume_id=volume_uid,
                        parent_id=parent_id,
                    )
                )
            status = {
                "sizeGib": math.ceil(info.size_bytes / 1024**3),
                "container": info.container,
                "chunks": info.chunks,
                "chunksStored": info.chunks_stored,
                "storedBytes": info.stored_bytes,
            }
            return self.succeeded(obj, status)
        except (Failure, OSError) as e:
            return self.failed(obj, classify(e, f"backup {obj.name}"), {})

    async def remove(self, obj: VolumeBackup) -> None:
        s = self.storage
        await s.run(s.backups.delete_backup, obj.uid)
        # A temporary snapshot an interrupted backup left behind.
        await s.run(_delete_snapshot, s.backends, temporary_snapshot_id(obj.uid))


# --- helpers -------------------------------------------------------------------------------


def _find_snapshot(backends: list[VolumeBackend], snapshot_id: str) -> Any:
    for backend in backends:
        found = backend.get_snapshot(snapshot_id)
        if found is not None:
            return found
    return None


def _delete_snapshot(backends: list[VolumeBackend], snapshot_id: str) -> None:
    for backend in backends:
        if backend.get_snapshot(snapshot_id) is not None:
            backend.delete_snapshot(snapshot_id)


def merged(current: ApiModel | None, wanted: dict[str, Any]) -> dict[str, Any]:
    """A nested status object for a merge patch: keys it no longer has are
    sent as null, or the API server would keep them."""
    out = {k: v for k, v in wanted.items() if v is not None}
    for key in current.wire() if current is not None else {}:
        out.setdefault(key, None)
    return out


def _touch_durably(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def parse_portal(text: str) -> tuple[str, int]:
    """HOST[:PORT] or [V6]:PORT; the port defaults to 3260."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.removeprefix(":") or 3260)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 3260


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
