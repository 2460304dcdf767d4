"""Sparse-file primitives: find data extents, copy thinly, wipe what is allocated.

Shared by the file backend and the backup driver. Everything here works on
plain paths and file descriptors; no commands are run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

FICLONE = 0x40049409  # ioctl(dst, FICLONE, src): share all extents (btrfs, XFS, ...)
WIPE_BLOCK = 8 * 1024**2
DIRECT_ALIGN = 4096  # covers 512 and 4096-byte logical blocks


def data_extents(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(offset, length) of each allocated range between start and end.

    Holes are skipped via SEEK_DATA/SEEK_HOLE; a filesystem without them
    reports the whole range as data, which is slower but still correct.
    """
    if end is None:
        end = os.fstat(fd).st_size
    offset = start
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, end - offset
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        offset = hole


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename, link or unlink inside path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_data(fd: int, start: int, end: int) -> bool:
    return next(data_extents(fd, start, end), None) is not None


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def open_elsewhere(path: str) -> bool:
    """Whether another open file description holds this file (tgtd, QEMU, dd).

    A write lease is granted only when nobody else has the file open, which
    asks the kernel instead of scanning /proc. The lease is dropped at once.
    Where leases are off, fall back to scanning /proc/*/fd.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            return _open_in_proc(path)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _open_in_proc(path: str) -> bool:
    st = os.stat(path)
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                other = os.stat(f"{fd_dir}/{name}")
                if other.st_ino == st.st_ino and other.st_dev == st.st_dev:
                    return True
    return False


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Share every extent of src with dst; False where the filesystem cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
            return False
        raise
    return True


def reflink_supported(directory: str) -> bool:
    """Probe once per pool: clone an empty scratch file inside directory."""
    a = os.path.join(directory, f".reflink-probe-{os.getpid()}-a")
    b = os.path.join(directory, f".reflink-probe-{os.getpid()}-b")
    try:
        with open(a, "w+b") as fa, open(b, "wb") as fb:
            fa.write(b"x" * 4096)
            fa.flush()
            return try_reflink(fa.fileno(), fb.fileno())
    finally:
        for p in (a, b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


@dataclass(frozen=True)
class CopyResult:
    reflinked: bool
    bytes_copied: int


def thin_copy(src: str, dst: str, size_bytes: int | None = None) -> CopyResult:
    """Copy src to a new file dst keeping holes; reflink when the fs can.

    dst is created exclusively (the caller picks a temporary name) and
    fsynced; its size is max(size of src, size_bytes).
    """
    with open(src, "rb") as fs:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            src_size = os.fstat(fs.fileno()).st_size
            reflinked = try_reflink(fs.fileno(), fd_out)
            copied = 0
            if not reflinked:
                for offset, length in data_extents(fs.fileno(), 0, src_size):
                    copied += _copy_range(fs.fileno(), fd_out, offset, length)
            os.ftruncate(fd_out, max(src_size, size_bytes or 0))
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    return CopyResult(reflinked, copied)


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        # copy_file_range stays in the kernel and may share blocks itself.
        n = os.copy_file_range(fd_in, fd_out, length - done, offset + done, offset + done)
        if n == 0:
            break
        done += n
    return done


def copy_data_into(src: str, dst: str) -> int:
    """Overwrite dst with src's data in place: src's holes become holes or zeros.

    Used to revert a volume to a snapshot without replacing the inode that
    an exporter may still know. Returns the bytes copied.
    """
    with open(src, "rb") as fs, open(dst, "r+b") as fd:
        size = os.fstat(fs.fileno()).st_size
        keep = max(size, os.fstat(fd.fileno()).st_size)  # a volume never shrinks
        os.ftruncate(fd.fileno(), 0)  # drops every extent; holes read back as zeros
        os.ftruncate(fd.fileno(), keep)
        copied = sum(
            _copy_range(fs.fileno(), fd.fileno(), off, n)
            for off, n in data_extents(fs.fileno(), 0, size)
        )
        os.fsync(fd.fileno())
    return copied


def zero_fill(path: str, *, block: int = WIPE_BLOCK) -> int:
    """Overwrite every allocated byte of a file or device with zeros, durably.

    For regular files only data extents are written (holes hold nothing to
    erase). Writes bypass the page cache (O_DIRECT) where the filesystem
    allows it, so the zeros reach the disk at dd-oflag=direct speed without
    evicting the node's cache; the unaligned tail (if any) goes through a
    buffered descriptor and fsync. Returns the bytes overwritten.
    """
    is_file = stat.S_ISREG(os.stat(path).st_mode)
    buffered = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    direct = _open_direct(path)
    zeros = mmap.mmap(-1, block)  # anonymous mappings are page-aligned and zeroed
    written = 0
    try:
        size = os.fstat(buffered).st_size if is_file else _device_size(buffered)
        extents = data_extents(buffered, 0, size) if is_file else iter([(0, size)])
        for offset, length in extents:
            written += _zero_range(direct, buffered, zeros, offset, length)
        os.fsync(buffered)
        if direct is not None:
            os.fsync(direct)
    finally:
        zeros.close()
        os.close(buffered)
        if direct is not None:
            os.close(direct)
    return written


def _open_direct(path: str) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:  # tmpfs and friends: no O_DIRECT
            return None
        raise


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _zero_range(
    direct: int | None, buffered: int, zeros: mmap.mmap, offset: int, length: int
) -> int:
    view = memoryview(zeros)
    end = offset + length
    pos = offset
    try:
        while pos < end:
            n = min(len(zeros), end - pos)
            aligned = direct is not None and pos % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0
            if not aligned and direct is not None and n > DIRECT_ALIGN and pos % DIRECT_ALIGN == 0:
                n -= n % DIRECT_ALIGN  # the aligned head now, the tail in the next round
                aligned = True
            fd = direct if aligned and direct is not None else buffered
            done = os.pwrite(fd, view[:n], pos)
            if done <= 0:
                raise OSError(errno.EIO, f"short write at {pos}")
            pos += done
    finally:
        view.release()
    return length
