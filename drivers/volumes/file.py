"""The default backend: sparse raw files in a pool directory on the node.

Layout under the pool directory (everything is read back from here, so a
restarted agent re-adopts what exists):

    volumes/<volume-id>.raw
    snapshots/<volume-id>/<snapshot-id>.raw
    .work/   files being made or being wiped (never listed as volumes)

Volumes are thin: creating 10 GiB costs an inode, not 10 GiB. Snapshots and
clones are reflinks where the filesystem shares extents and sparse copies of
the allocated extents otherwise. New files appear under their final name only
once complete (made in .work/, then hard-linked into place), so a crash never
leaves a half-copied volume that looks real.

Delete is "secure": the file is first moved into .work/ (so nothing can find
and open it again), then every allocated extent is overwritten with zeros,
then it is unlinked. A crash mid-wipe is finished by the next delete of the
same id or by `finish_interrupted_work()` at start-up.

(About 460 lines: the backend's verbs share the pool layout and its crash-
safe file moves.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

from nubes.drivers.hostfiles import make_private_dir
from nubes.drivers.runner import Runner
from nubes.drivers.volumes import image, sparse
from nubes.drivers.volumes.base import (
    GIB,
    ImageRejected,
    NoSpace,
    NotFound,
    PoolStats,
    ShrinkRefused,
    SnapshotInfo,
    StorageError,
    VolumeBusy,
    VolumeInfo,
    check_id,
    check_size,
)

log = structlog.get_logger()

SUFFIX = ".raw"


class FileBackend:
    """Implements VolumeBackend, ImageImport and SnapshotRevert."""

    def __init__(
        self,
        runner: Runner,
        directory: str | os.PathLike[str],
        *,
        backend_name: str = "file",
        pool_name: str = "default",
        max_over_subscription_ratio: float = 20.0,
        reserved_percentage: int = 0,
    ) -> None:
        self.runner = runner
        self.root = Path(directory)
        self.backend_name = backend_name
        self.pool_name = pool_name
        self.max_over_subscription_ratio = max_over_subscription_ratio
        self.reserved_percentage = reserved_percentage
        self._volumes = self.root / "volumes"
        self._snapshots = self.root / "snapshots"
        self._work = self.root / ".work"
        # Volume data is the tenants': root only (tgtd reads the files; QEMU
        # reaches volumes through iSCSI, never through these paths).
        for d in (self.root, self._volumes, self._snapshots, self._work):
            make_private_dir(d)
        self._reflink: bool | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.log = log.bind(backend=backend_name, pool=pool_name)

    # --- paths and lookups --------------------------------------------------------

    def _volume_file(self, volume_id: str) -> Path:
        return self._volumes / f"{check_id('volume', volume_id)}{SUFFIX}"

    def _find_snapshot(self, snapshot_id: str) -> Path | None:
        name = f"{check_id('snapshot', snapshot_id)}{SUFFIX}"
        for d in self._snapshot_dirs():
            if (d / name).exists():
                return d / name
        return None

    def _snapshot_dirs(self) -> list[Path]:
        return sorted(p for p in self._snapshots.iterdir() if p.is_dir())

    def _volume_info(self, volume_id: str, path: Path) -> VolumeInfo:
        st = path.stat()
        return VolumeInfo(
            id=volume_id,
            size_gib=_gib_up(st.st_size),
            path=str(path),
            allocated_bytes=st.st_blocks * 512,
        )

    def _snapshot_info(self, path: Path) -> SnapshotInfo:
        st = path.stat()
        return SnapshotInfo(
            id=path.name[: -len(SUFFIX)],
            volume_id=path.parent.name,
            size_gib=_gib_up(st.st_size),
            path=str(path),
            allocated_bytes=st.st_blocks * 512,
        )

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Serialise the verbs touching one volume or snapshot in this process
        (e.g. a snapshot being copied while a delete would wipe its source)."""
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def _tmp(self, what: str, ident: str) -> Path:
        return self._work / f"new-{what}-{ident}.{secrets.token_hex(4)}.tmp"

    def _publish(self, tmp: Path, final: Path) -> bool:
        """Hard-link tmp into place without clobbering; False if final exists."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            self._finish_wipe(tmp)  # lost a race; the copy may hold data
            return False
        tmp.unlink()
        sparse.fsync_dir(final.parent)
        return True

    # --- the core -----------------------------------------------------------------

    def get_volume(self, volume_id: str) -> VolumeInfo | None:
        path = self._volume_file(volume_id)
        try:
            return self._volume_info(volume_id, path)
        except FileNotFoundError:
            return None

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        path = self._find_snapshot(snapshot_id)
        if path is None:
            return None
        try:
            return self._snapshot_info(path)
        except FileNotFoundError:
            return None

    def volume_path(self, volume_id: str) -> str:
        info = self.get_volume(volume_id)
        if info is None:
            raise NotFound("volume", volume_id, f"pool {self.pool_name}")
        return info.path

    def list_volumes(self) -> list[VolumeInfo]:
        found = []
        for p in sorted(self._volumes.glob(f"*{SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):
                found.append(self._volume_info(p.name[: -len(SUFFIX)], p))
        return found

    def list_snapshots(self) -> list[SnapshotInfo]:
        found = []
        for d in self._snapshot_dirs():
            for p in sorted(d.glob(f"*{SUFFIX}")):
                with contextlib.suppress(FileNotFoundError):
                    found.append(self._snapshot_info(p))
        return found

    def create_volume(self, volume_id: str, size_gib: int) -> VolumeInfo:
        check_size(size_gib)
        final = self._volume_file(volume_id)
        existing = self.get_volume(volume_id)
        if existing is not None:
            return existing
        self._check_thin_room(f"volume {volume_id}", size_gib)
        tmp = self._tmp("volume", volume_id)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_gib * GIB)  # a hole: costs no blocks
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._publish(tmp, final):
            self.log.info("volume created", volume=volume_id, size_gib=size_gib)
        return self._volume_info(volume_id, final)

    def delete_volume(self, volume_id: str) -> None:
        with self._locked(f"volume:{volume_id}"):
            path = self._volume_file(volume_id)
            trash = self._work / f"deleting-volume-{volume_id}{SUFFIX}"
            self._finish_wipe(trash)  # an earlier delete's leftovers, before reusing the name
            if not path.exists():
                return
            snaps = self._snapshots / volume_id
            if snaps.is_dir() and any(snaps.glob(f"*{SUFFIX}")):
                names = sorted(p.name[: -len(SUFFIX)] for p in snaps.glob(f"*{SUFFIX}"))
                raise VolumeBusy(volume_id, f"it has snapshots: {', '.join(names)}")
            self._refuse_if_open(volume_id, path)
            os.rename(path, trash)
            sparse.fsync_dir(self._volumes)
            wiped = self._finish_wipe(trash)
            with contextlib.suppress(FileNotFoundError, OSError):
                snaps.rmdir()
            self.log.info("volume deleted", volume=volume_id, wiped_bytes=wiped)

    def extend_volume(self, volume_id: str, new_size_gib: int) -> VolumeInfo:
        check_size(new_size_gib)
        with self._locked(f"volume:{volume_id}"):
            info = self.get_volume(volume_id)
            if info is None:
                raise NotFound("volume", volume_id, f"pool {self.pool_name}")
            if new_size_gib < info.size_gib:
                raise ShrinkRefused(volume_id, info.size_gib, new_size_gib)
            if new_size_gib == info.size_gib:
                return info
            # An exporter or a guest would not see the new size: extend only detached.
            self._refuse_if_open(volume_id, Path(info.path))
            self._check_thin_room(f"extending {volume_id}", new_size_gib - info.size_gib)
            os.truncate(info.path, new_size_gib * GIB)
            _fsync_path(info.path)
            self.log.info(
                "volume extended", volume=volume_id, old_gib=info.size_gib, new_gib=new_size_gib
            )
            return self._volume_info(volume_id, Path(info.path))

    def create_snapshot(self, snapshot_id: str, volume_id: str) -> SnapshotInfo:
        check_id("snapshot", snapshot_id)
        with self._locked(f"volume:{volume_id}"):
            existing = self.get_snapshot(snapshot_id)
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise StorageError(
                        f"snapshot id {snapshot_id} is already a snapshot of volume"
                        f" {existing.volume_id}, not {volume_id}"
                    )
                return existing
            source = self.volume_path(volume_id)
            folder = self._snapshots / volume_id
            make_private_dir(folder)
            final = folder / f"{snapshot_id}{SUFFIX}"
            self._copy_into_place(f"snapshot {snapshot_id}", source, final, None)
            self.log.info("snapshot created", snapshot=snapshot_id, volume=volume_id)
            return self._snapshot_info(final)

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._locked(f"snapshot:{snapshot_id}"):
            trash = self._work / f"deleting-snapshot-{snapshot_id}{SUFFIX}"
            self._finish_wipe(trash)
            path = self._find_snapshot(snapshot_id)
            if path is None:
                return
            if sparse.open_elsewhere(str(path)):
                raise StorageError(f"snapshot {snapshot_id} is in use (open by another process)")
            os.rename(path, trash)
            sparse.fsync_dir(path.parent)
            wiped = self._finish_wipe(trash)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when it was the volume's last snapshot
            self.log.info("snapshot deleted", snapshot=snapshot_id, wiped_bytes=wiped)

    def create_volume_from_snapshot(
        self, volume_id: str, snapshot_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        existing = self.get_volume(volume_id)
        if existing is not None:
            return existing
        with self._locked(f"snapshot:{snapshot_id}"):
            snap = self.get_snapshot(snapshot_id)
            if snap is None:
                raise NotFound("snapshot", snapshot_id, f"pool {self.pool_name}")
            return self._new_volume_from(volume_id, snap.path, snap.size_gib, size_gib)

    def clone_volume(
        self, volume_id: str, source_volume_id: str, size_gib: int | None = None
    ) -> VolumeInfo:
        existing = self.get_volume(volume_id)
        if existing is not None:
            return existing
        with self._locked(f"volume:{source_volume_id}"):
            src = self.get_volume(source_volume_id)
            if src is None:
                raise NotFound("volume", source_volume_id, f"pool {self.pool_name}")
            return self._new_volume_from(volume_id, src.path, src.size_gib, size_gib)

    def _new_volume_from(
        self, volume_id: str, source: str, source_gib: int, size_gib: int | None
    ) -> VolumeInfo:
        size = source_gib if size_gib is None else check_size(size_gib)
        if size < source_gib:
            raise ShrinkRefused(volume_id, source_gib, size)
        self._check_thin_room(f"volume {volume_id}", size)
        final = self._volume_file(volume_id)
        self._copy_into_place(f"volume {volume_id}", source, final, size * GIB)
        self.log.info("volume created from copy", volume=volume_id, source=source, size_gib=size)
        return self._volume_info(volume_id, final)

    def _copy_into_place(self, what: str, source: str, final: Path, size: int | None) -> None:
        if not self.reflink_supported():
            needed = sparse.allocated_bytes(source)
            free = self._free_bytes()
            if needed > free:
                raise NoSpace(what, needed / GIB, free / GIB, self.pool_name)
        tmp = self._tmp("copy", final.name)
        try:
            result = sparse.thin_copy(source, str(tmp), size)
        except OSError as e:
            self._finish_wipe(tmp)  # a partial copy still holds data
            if e.errno == errno.ENOSPC:
                raise NoSpace(what, sparse.allocated_bytes(source) / GIB, 0, self.pool_name) from e
            raise
        self.log.debug("copied", what=what, reflinked=result.reflinked, bytes=result.bytes_copied)
        if not self._publish(tmp, final):
            self.log.info("already there", what=what)

    def pool_stats(self) -> PoolStats:
        st = os.statvfs(self.root)
        volumes = self.list_volumes()
        snapshots = self.list_snapshots()
        provisioned = sum(v.size_gib for v in volumes) + sum(s.size_gib for s in snapshots)
        return PoolStats(
            backend_name=self.backend_name,
            pool_name=self.pool_name,
            total_gib=st.f_blocks * st.f_frsize / GIB,
            free_gib=st.f_bavail * st.f_frsize / GIB,
            provisioned_gib=float(provisioned),
            total_volumes=len(volumes),
            capabilities={
                "storage_protocol": "iSCSI",
                "thin_provisioning_support": True,
                "thick_provisioning_support": False,
                "max_over_subscription_ratio": self.max_over_subscription_ratio,
                "reserved_percentage": self.reserved_percentage,
                "sparse_copy_volume": True,
                "reflink_snapshots": self.reflink_supported(),
                "revert_to_snapshot_support": True,
                "multiattach": False,
                "QoS_support": False,
            },
        )

    # --- optional capabilities ------------------------------------------------------

    def copy_image_to_volume(
        self, volume_id: str, image_path: str, image_format: str
    ) -> VolumeInfo:
        with self._locked(f"volume:{volume_id}"):
            info = self.get_volume(volume_id)
            if info is None:
                raise NotFound("volume", volume_id, f"pool {self.pool_name}")
            facts = image.inspect_image(self.runner, image_path, image_format)
            if facts.virtual_size > info.size_gib * GIB:
                raise ImageRejected(
                    f"image {image_path} needs {facts.virtual_size} bytes;"
                    f" volume {volume_id} has {info.size_gib} GiB"
                )
            self._refuse_if_open(volume_id, Path(info.path))
            fd = os.open(info.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                blank = not sparse.has_data(fd, 0, info.size_gib * GIB)
            finally:
                os.close(fd)
            image.convert_to_raw(
                self.runner, image_path, image_format, info.path, target_is_zero=blank
            )
            return self._volume_info(volume_id, Path(info.path))

    def revert_to_snapshot(self, volume_id: str, snapshot_id: str) -> VolumeInfo:
        with self._locked(f"volume:{volume_id}"):
            info = self.get_volume(volume_id)
            if info is None:
                raise NotFound("volume", volume_id, f"pool {self.pool_name}")
            snap = self.get_snapshot(snapshot_id)
            if snap is None or snap.volume_id != volume_id:
                raise NotFound("snapshot", snapshot_id, f"the snapshots of volume {volume_id}")
            self._refuse_if_open(volume_id, Path(info.path))
            # In place, so the inode (and any later export of it) stays the same;
            # the blocks let go of are zeroed first like any other freed data.
            sparse.zero_fill(info.path)
            sparse.copy_data_into(snap.path, info.path)
            self.log.info("volume reverted", volume=volume_id, snapshot=snapshot_id)
            return self._volume_info(volume_id, Path(info.path))

    # --- maintenance --------------------------------------------------------------

    def finish_interrupted_work(self) -> list[str]:
        """Wipe and remove what a crash left in .work/ (call once at start-up,
        before serving requests). Returns the file names handled."""
        done = []
        for p in sorted(self._work.iterdir()):
            self._finish_wipe(p)
            done.append(p.name)
        if done:
            self.log.info("finished interrupted work", files=done)
        return done

    def reflink_supported(self) -> bool:
        if self._reflink is None:
            self._reflink = sparse.reflink_supported(str(self._work))
        return self._reflink

    # --- helpers ------------------------------------------------------------------

    def _finish_wipe(self, path: Path) -> int:
        try:
            wiped = sparse.zero_fill(str(path))
        except FileNotFoundError:
            return 0
        path.unlink(missing_ok=True)
        return wiped

    def _refuse_if_open(self, volume_id: str, path: Path) -> None:
        if sparse.open_elsewhere(str(path)):
            raise VolumeBusy(
                volume_id, "its file is open by another process (exported or attached)"
            )

    def _free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _check_thin_room(self, what: str, add_gib: int) -> None:
        st = os.statvfs(self.root)
        total_gib = st.f_blocks * st.f_frsize / GIB
        usable = total_gib * (1 - self.reserved_percentage / 100) * self.max_over_subscription_ratio
        provisioned = sum(v.size_gib for v in self.list_volumes()) + sum(
            s.size_gib for s in self.list_snapshots()
        )
        if provisioned + add_gib > usable:
            raise NoSpace(what, float(add_gib), max(usable - provisioned, 0.0), self.pool_name)


def _gib_up(size: int) -> int:
    return -(-size // GIB)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
