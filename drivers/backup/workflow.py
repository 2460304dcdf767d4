"""Back up and restore volumes of a backend through a backup store.

Cinder's sequence: a backup reads a temporary snapshot (so the volume can
stay in use and the copy is point-in-time), and the snapshot is removed
whatever happens; a restore fills a new blank volume. Both are idempotent
per id, so an interrupted call is simply repeated.
"""

from __future__ import annotations

import structlog

from nubes.drivers.backup.posix import BackupInfo, PosixBackupStore, RestoreResult
from nubes.drivers.volumes.base import GIB, NotFound, VolumeBackend, VolumeInfo

log = structlog.get_logger()


def temporary_snapshot_id(backup_id: str) -> str:
    return f"backup-{backup_id}"


def backup_volume(
    backend: VolumeBackend,
    store: PosixBackupStore,
    *,
    backup_id: str,
    volume_id: str,
    incremental: bool = False,
    parent_id: str | None = None,
) -> BackupInfo:
    """Back up a volume from a temporary snapshot.

    incremental builds on the volume's latest backup in the store (a full
    backup when there is none yet); the result's parent_id says which. A
    caller that chose the parent itself passes parent_id (implies incremental).
    """
    done = store.get_backup(backup_id)
    if done is not None:
        return done
    if backend.get_volume(volume_id) is None:
        raise NotFound("volume", volume_id, f"pool {backend.pool_name}")
    if parent_id is None and incremental:
        latest = store.latest_backup(volume_id)
        parent_id = latest.backup_id if latest else None
    snap_id = temporary_snapshot_id(backup_id)
    snap = backend.create_snapshot(snap_id, volume_id)
    try:
        return store.create_backup(backup_id, volume_id, snap.path, parent_id=parent_id)
    finally:
        backend.delete_snapshot(snap_id)


def restore_to_new_volume(
    backend: VolumeBackend,
    store: PosixBackupStore,
    *,
    backup_id: str,
    volume_id: str,
    size_gib: int | None = None,
) -> tuple[VolumeInfo, RestoreResult]:
    """Create a blank volume (at least the backup's size) and restore into it.

    If the restore fails the volume is left for the caller to delete; it is
    not reported restored.
    """
    info = store.get_backup(backup_id)
    if info is None:
        raise NotFound("backup", backup_id, str(store.root))
    need = -(-info.size_bytes // GIB)
    volume = backend.create_volume(volume_id, max(need, size_gib or 0))
    result = store.restore_backup(backup_id, volume.path)
    log.info("volume restored", volume=volume_id, backup=backup_id)
    return volume, result
