"""The per-node image cache and the instance disks made from it (Nova's `_base`).

An image is copied once per node from the image store (never from a
tenant's URL: only the controller fetches those, under its fetch policy)
into `ROOT/_base/<sha256>`, verified against its SHA-256 while streaming,
inspected (nubes.drivers.images.inspect) and stored as RAW: a qcow2 image
is converted, because every instance's root disk is a qcow2 overlay whose
backing file is the shared base, and a raw backing file is the simplest,
fastest one for QEMU. The base never changes;
instance disks do.

Everything is idempotent and safe to repeat after a crash: downloads go to
temporary files that are renamed into place only when complete and checked,
and a per-image lock makes concurrent callers (agent workers, processes)
download an image once. `prune(in_use)` deletes what no instance needs.

(About 500 lines: copying, verifying, converting and the overlay disks share
the cache layout and its locks.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import structlog

from nubes.drivers.hostfiles import guest_file, make_guest_dir
from nubes.drivers.images.inspect import (
    ImageFormat,
    ImageInspectionError,
    cross_check,
    inspect_image,
    sector_aligned,
    verify_image,
)
from nubes.drivers.problem import Failure
from nubes.drivers.runner import CommandError, Runner

log = structlog.get_logger()

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
# Temporary files older than this belong to a crashed fetch.
STALE_TMP_SECONDS = 3600


class ImageCacheError(Failure):
    """Base of the cache's errors; `str(e)` is a message for people. Bad
    data (checksum, inspection, size) waits for a new image: not retried."""

    reason = "ImageCacheFailed"
    retryable = False


class InvalidImageSource(ImageCacheError, ValueError):
    reason = "InvalidSource"


class ImageFetchError(ImageCacheError):
    """The store copy could not be read (missing, unreadable)."""

    reason = "ImageFetchFailed"
    retryable = True


class ChecksumMismatch(ImageCacheError):
    """The data is not what was promised. The digest of the rejected data is
    kept for the operator's logs, never put in the message: a tenant could
    otherwise learn the hash of data it cannot read."""

    reason = "ChecksumMismatch"

    def __init__(self, source: str, expected: str, actual: str) -> None:
        self.source = source
        self.expected = expected
        self.actual = actual
        super().__init__(f"image from {source} does not have the SHA-256 {expected}")


class ImageRejected(ImageCacheError):
    """Inspection refused the data; `reason` and `problem` come from it."""

    def __init__(self, url: str, error: ImageInspectionError) -> None:
        self.url = url
        self.reason = error.reason
        self.problem = error.problem
        super().__init__(f"image from {url}: {error.problem}")


class ImageTooLarge(ImageCacheError):
    reason = "ImageTooLarge"


class DiskTooSmall(ImageCacheError):
    reason = "DiskTooSmall"

    def __init__(self, disk: str, requested: int, needed: int) -> None:
        self.requested = requested
        self.needed = needed
        super().__init__(
            f"disk {disk} cannot be {requested} bytes: the image needs {needed}; disks only grow"
        )


class DiskConflict(ImageCacheError):
    """A file is where a disk should be, but it is not that disk."""

    reason = "DiskConflict"


@dataclass(frozen=True)
class ImageSource:
    """What to cache: its file in the image store, its SHA-256 (the cache key)
    and its declared format."""

    path: str
    """Absolute path of the verified copy in the image store."""
    sha256: str
    """SHA-256 of the data at `url`, lowercase hex."""
    disk_format: str
    """Declared format ("raw" or "qcow2"); data in any other format is refused."""


@dataclass(frozen=True)
class CachedImage:
    sha256: str
    path: str
    """The RAW base file; read-only, shared by every instance disk."""
    virtual_size: int
    source_format: ImageFormat


@dataclass(frozen=True)
class DiskInfo:
    path: str
    virtual_size: int
    backing_file: str | None


@dataclass(frozen=True)
class SnapshotFile:
    path: str
    sha256: str
    size: int
    virtual_size: int


class ImageCache:
    """One node's cache under `root` (for example /var/lib/nubes/instances).

    QEMU (libvirt's DAC driver runs guests as libvirt-qemu) reads the bases
    through its group: bases are 0640 in 0750 directories, root:<QEMU group>
    (nubes.drivers.hostfiles); nobody else on the node reads guest data.
    """

    def __init__(
        self,
        root: str,
        runner: Runner,
        *,
        max_image_bytes: int | None = None,
        convert_timeout: float = 3600,
    ) -> None:
        self.root = os.path.abspath(root)
        self.base_dir = os.path.join(self.root, "_base")
        self.tmp_dir = os.path.join(self.base_dir, ".tmp")
        self.lock_dir = os.path.join(self.base_dir, ".locks")
        self.runner = runner
        self.max_image_bytes = max_image_bytes
        self.convert_timeout = convert_timeout

    # --- the cache -------------------------------------------------------------

    def base_path(self, sha256: str) -> str:
        _check_sha(sha256)
        return os.path.join(self.base_dir, sha256)

    def cached(self, sha256: str) -> CachedImage | None:
        """The cached base for `sha256`, or None."""
        path = self.base_path(sha256)
        try:
            meta = json.loads(_read(path + ".json"))
            size = os.stat(path).st_size
        except (OSError, ValueError):
            return None
        fmt = ImageFormat(meta.get("source_format", "raw"))
        return CachedImage(sha256, path, sector_aligned(size), fmt)

    def ensure_image(self, source: ImageSource) -> CachedImage:
        """Fetch, verify, inspect and store the image unless it is already cached."""
        _check_source(source)
        found = self.cached(source.sha256)
        if found is not None:
            _touch(found.path)
            return found
        self._ensure_dirs()
        with self._lock(source.sha256):
            found = self.cached(source.sha256)  # another caller finished first
            if found is not None:
                return found
            return self._fetch_and_store(source)

    def _fetch_and_store(self, source: ImageSource) -> CachedImage:
        started = time.monotonic()
        with contextlib.ExitStack() as cleanup:
            download = self._tmp_file(cleanup, "download")
            actual, size = self._copy_in(source.path, download)
            if actual != source.sha256:
                log.warning("cached image digest mismatch", path=source.path, actual=actual)
                raise ChecksumMismatch(source.path, source.sha256, actual)
            try:
                info = verify_image(download, source.disk_format)
                cross_check(self.runner, info)
            except ImageInspectionError as e:
                raise ImageRejected(source.path, e) from e
            if info.format == ImageFormat.RAW:
                stored = download
            else:
                stored = self._tmp_file(cleanup, "raw")
                self.runner(
                    ["qemu-img", "convert", "-f", str(info.format), "-O", "raw", download, stored],
                    timeout=self.convert_timeout,
                )
            guest_file(stored)  # a backing file QEMU reads: root and QEMU only
            _fsync(stored)
            path = self.base_path(source.sha256)
            _write_atomic(
                path + ".json",
                json.dumps(
                    {"source_format": str(info.format), "bytes": size},
                    sort_keys=True,
                ),
            )
            os.replace(stored, path)
            _fsync(self.base_dir)
        log.info(
            "image cached",
            sha256=source.sha256,
            format=str(info.format),
            bytes=size,
            seconds=round(time.monotonic() - started, 2),
        )
        cached = self.cached(source.sha256)
        assert cached is not None
        return cached

    def _copy_in(self, path: str, dest: str) -> tuple[str, int]:
        """Copy a store file into `dest`; returns (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if self.max_image_bytes is not None and size > self.max_image_bytes:
                        raise ImageTooLarge(
                            f"image {path} is larger than {self.max_image_bytes} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as e:
            raise ImageFetchError(f"cannot read {path}: {e.strerror or e}") from e
        return digest.hexdigest(), size

    def prune(self, in_use: Iterable[str], *, min_unused_seconds: float = 0) -> list[str]:
        """Delete cached images whose SHA-256 is not in `in_use`.

        An image used (ensured) within `min_unused_seconds`, or being fetched
        right now, is kept. Returns the digests removed.
        """
        keep = set(in_use)
        removed: list[str] = []
        if not os.path.isdir(self.base_dir):
            return removed
        now = time.time()
        for name in sorted(os.listdir(self.base_dir)):
            if not SHA256.match(name) or name in keep:
                continue
            path = os.path.join(self.base_dir, name)
            try:
                if now - os.stat(path).st_mtime < min_unused_seconds:
                    continue
            except FileNotFoundError:
                continue
            with self._lock(name, blocking=False) as held:
                if not held:
                    continue
                for victim in (path, path + ".json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(victim)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.lock_dir, name + ".lock"))
            removed.append(name)
            log.info("image pruned", sha256=name)
        # Metadata left alone by a crash between the two writes.
        for name in os.listdir(self.base_dir):
            digest = name.removesuffix(".json")
            orphan = not os.path.exists(os.path.join(self.base_dir, digest))
            if name.endswith(".json") and SHA256.match(digest) and orphan:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.base_dir, name))
        self._remove_stale_tmp(now)
        return removed

    def _remove_stale_tmp(self, now: float) -> None:
        if not os.path.isdir(self.tmp_dir):
            return
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(path).st_mtime > STALE_TMP_SECONDS:
                    os.unlink(path)

    # --- instance disks ----------------------------------------------------------

    def ensure_instance_disk(
        self, image: CachedImage, disk_path: str, size_bytes: int | None = None
    ) -> DiskInfo:
        """A qcow2 overlay on the cached base, at least `size_bytes` big.

        None means the image's own size. An existing overlay on the same base
        is kept (and grown if smaller); a different file there is an error.
        """
        needed = image.virtual_size
        want = needed if size_bytes is None else size_bytes
        if want < needed:
            raise DiskTooSmall(disk_path, want, needed)
        if os.path.exists(disk_path):
            info = inspect_image(disk_path)
            if info.format != ImageFormat.QCOW2 or info.backing_file != image.path:
                raise DiskConflict(
                    f"{disk_path} exists but is not an overlay on {image.path}"
                    f" ({info.format}, backing {info.backing_file!r})"
                )
            return self.grow_disk(disk_path, want)
        os.makedirs(os.path.dirname(os.path.abspath(disk_path)), mode=0o755, exist_ok=True)
        tmp = disk_path + ".creating"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        self.runner(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                image.path,
                tmp,
                str(want),
            ]
        )
        os.replace(tmp, disk_path)
        log.info("instance disk created", disk=disk_path, base=image.sha256, bytes=want)
        return DiskInfo(disk_path, want, image.path)

    @staticmethod
    def disk_info(disk_path: str) -> DiskInfo:
        """Virtual size and backing file of an instance disk, from its qcow2
        header: unlike qemu-img info this needs no lock, so it also works
        while a guest runs from the disk."""
        info = inspect_image(disk_path)
        if info.format != ImageFormat.QCOW2 or info.virtual_size is None:
            raise DiskConflict(f"{disk_path} is not a qcow2 instance disk ({info.format})")
        return DiskInfo(disk_path, info.virtual_size, info.backing_file)

    def grow_disk(self, disk_path: str, size_bytes: int) -> DiskInfo:
        """Grow a qcow2 disk to `size_bytes`; a no-op when it is that big already.

        Only while no guest uses it (a running guest grows through libvirt).
        """
        current = self.disk_info(disk_path)
        if size_bytes < current.virtual_size:
            raise DiskTooSmall(disk_path, size_bytes, current.virtual_size)
        if size_bytes == current.virtual_size:
            return current
        self.runner(["qemu-img", "resize", "-q", "-f", "qcow2", disk_path, str(size_bytes)])
        log.info("instance disk grown", disk=disk_path, bytes=size_bytes)
        return DiskInfo(disk_path, size_bytes, current.backing_file)

    def snapshot_disk(
        self, disk_path: str, target_path: str, *, force_share: bool = False
    ) -> SnapshotFile:
        """Flatten an instance disk (overlay + base) into a standalone qcow2.

        The guest must not be writing (shut off or paused); `force_share`
        lets qemu-img read an image a paused QEMU still holds open. An
        existing target is returned as it is.
        """
        if not os.path.exists(target_path):
            os.makedirs(os.path.dirname(os.path.abspath(target_path)), exist_ok=True)
            tmp = target_path + ".converting"
            argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2"]
            if force_share:
                argv.append("-U")
            try:
                self.runner([*argv, disk_path, tmp], timeout=self.convert_timeout)
                _fsync(tmp)
                os.replace(tmp, target_path)
            except (CommandError, OSError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            log.info("instance disk snapshotted", disk=disk_path, target=target_path)
        info = inspect_image(target_path)
        return SnapshotFile(
            path=target_path,
            sha256=sha256_file(target_path),
            size=info.file_size,
            virtual_size=info.virtual_size or 0,
        )

    @staticmethod
    def delete_disk(disk_path: str) -> None:
        """Remove an instance disk; succeeds when it is already gone."""
        for path in (disk_path, disk_path + ".creating"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- plumbing ------------------------------------------------------------------

    def _ensure_dirs(self) -> None:
        for d in (self.root, self.base_dir):
            make_guest_dir(d)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)

    def _tmp_file(self, cleanup: contextlib.ExitStack, kind: str) -> str:
        fd, path = tempfile.mkstemp(prefix=f"{kind}-", dir=self.tmp_dir)
        os.close(fd)
        cleanup.callback(_unlink_quietly, path)
        return path

    @contextlib.contextmanager
    def _lock(self, sha256: str, *, blocking: bool = True) -> Iterator[bool]:
        os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.lock_dir, sha256 + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _check_sha(sha256: str) -> None:
    if not SHA256.match(sha256):
        raise InvalidImageSource(f"{sha256!r} is not a lowercase hex SHA-256")


def _check_source(source: ImageSource) -> None:
    _check_sha(source.sha256)
    if not os.path.isabs(source.path):
        raise InvalidImageSource(f"image source {source.path!r} is not an absolute path")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch(path: str) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
