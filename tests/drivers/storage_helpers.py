"""Helpers for the block-storage driver tests: where a file's blocks sit on
the disk (FIEMAP), reading the raw device, tgtd state, leak checks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQLLLL")
_EXTENT = struct.Struct("=QQQQQLLLL")


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def physical_extents(path: str, max_extents: int = 512) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of each extent of a file, via FIEMAP."""
    buf = bytearray(_HEADER.size + _EXTENT.size * max_extents)
    _HEADER.pack_into(buf, 0, 0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, max_extents, 0)
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = _HEADER.unpack_from(buf, 0)[3]
    out = []
    for i in range(mapped):
        logical, physical, length, *_ = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
        out.append((logical, physical, length))
    return out


@contextlib.contextmanager
def loop_filesystem(workdir: Path, size_mib: int = 256) -> Iterator[tuple[Path, Path]]:
    """A fresh ext4 in an image file, loop-mounted: (mount point, image).

    The image file *is* the disk, so reading it at an extent's physical
    offset shows what the disk holds, bypassing the filesystem (the real
    disk's device node may be off limits, as it is on the project machines).
    """
    image = workdir / "disk.img"
    mount = workdir / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    done = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        image.unlink()
        pytest.skip(f"cannot loop-mount a scratch filesystem here: {done.stderr.strip()}")
    try:
        yield mount, image
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        image.unlink()
        mount.rmdir()


def read_image(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def tgt_show() -> str:
    return subprocess.run(
        ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def tgt_accounts() -> list[str]:
    out = subprocess.run(
        ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "account"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def tgtd_running() -> bool:
    try:
        return (
            subprocess.run(
                ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "sys"],
                capture_output=True,
                timeout=5,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
