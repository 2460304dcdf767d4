"""The storage node's verbs: every side effect of holding, filling,
growing, exporting and removing volumes on this node, through the volume
backends, the tgt exporter, the backup store and the node's image cache
(an injected runner underneath). Idempotent; they read no API objects:
the storage agent (nubes.agent.storage) resolves what to do and reports it.

Initial contents written into an existing volume (image, backup) are
bracketed by a marker file, so that a volume whose copy was interrupted
(crash, corrupt backup) is never reported filled; it is filled again.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from nubes.drivers.backup.posix import PosixBackupStore
from nubes.drivers.backup.workflow import restore_to_new_volume
from nubes.drivers.images.cache import ImageCache, ImageSource
from nubes.drivers.iscsi.connection import ChapCredentials, IscsiConnection
from nubes.drivers.iscsi.tgt import TgtExporter
from nubes.drivers.problem import fail
from nubes.drivers.runner import Runner
from nubes.drivers.volumes.base import (
    ImageImport,
    PoolStats,
    SnapshotInfo,
    VolumeBackend,
    VolumeInfo,
)
from nubes.drivers.volumes.file import FileBackend
from nubes.drivers.volumes.lvm import LvmBackend, detect_lvm

log = structlog.get_logger()


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


@dataclass(frozen=True)
class FillSource:
    """What a new volume is filled from, resolved to backend ids."""

    kind: str  # "snapshot", "volume", "backup", "image"
    ident: str
    """Snapshot, volume or backup uid; image sha256."""
    image: ImageSource | None = None
    described: str = ""


class StorageNode:
    def __init__(
        self,
        backends: list[VolumeBackend],
        exporter: TgtExporter,
        backups: PosixBackupStore,
        images: ImageCache,
        markers: Path,
    ) -> None:
        self.backends = backends
        self.exporter = exporter
        self.backups = backups
        self.images = images
        self.markers = markers
        self.markers.mkdir(parents=True, exist_ok=True)

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
        self, backend: VolumeBackend, volume_id: str, size_gib: int, source: FillSource | None
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
        touch_durably(marker)
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
        where = backend if backend is not None and backend.get_volume(volume_id) else None
        target = where or self.holding(volume_id)
        if target is not None:
            target.delete_volume(volume_id)
        self.marker(volume_id).unlink(missing_ok=True)

    def export(
        self, volume_id: str, path: str, chap: ChapCredentials, initiators: list[str]
    ) -> IscsiConnection:
        return self.exporter.ensure_export(volume_id, path, chap=chap, initiators=initiators)

    def unexport(self, volume_id: str) -> None:
        self.exporter.remove_export(volume_id)

    def prune_exports(self, wanted: set[str]) -> list[str]:
        mine = {v.id for b in self.backends for v in b.list_volumes()}
        if not mine - wanted:
            return []  # nothing here could be exported by mistake: leave tgtd alone
        return self.exporter.remove_exports_of(mine - wanted)

    def finish_interrupted_work(self) -> None:
        for backend in self.backends:
            if isinstance(backend, FileBackend):
                backend.finish_interrupted_work()

    def pool_stats(self) -> list[PoolStats]:
        return [b.pool_stats() for b in self.backends]

    def find_snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        for backend in self.backends:
            found = backend.get_snapshot(snapshot_id)
            if found is not None:
                return found
        return None

    def delete_snapshot(self, snapshot_id: str) -> None:
        for backend in self.backends:
            if backend.get_snapshot(snapshot_id) is not None:
                backend.delete_snapshot(snapshot_id)


def touch_durably(path: Path) -> None:
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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
