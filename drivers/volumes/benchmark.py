"""Figures for bench/: thin-create cost and secure-wipe speed against dd.

Returns numbers only; what to print or assert is the caller's choice.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

from nubes.drivers.runner import Runner
from nubes.drivers.volumes import sparse
from nubes.drivers.volumes.base import MIB, VolumeBackend


@dataclass(frozen=True)
class CreateTiming:
    count: int
    size_gib: int
    seconds: float
    per_volume_ms: float
    allocated_bytes: int
    """Space all the new volumes use together (thin: about zero)."""


@dataclass(frozen=True)
class WipeComparison:
    size_mib: int
    wipe_seconds: float
    dd_seconds: float

    @property
    def wipe_mib_s(self) -> float:
        return self.size_mib / self.wipe_seconds

    @property
    def dd_mib_s(self) -> float:
        return self.size_mib / self.dd_seconds

    @property
    def ratio(self) -> float:
        """Wipe speed over dd speed (>= 0.5 is the project's bar)."""
        return self.dd_seconds / self.wipe_seconds


def time_thin_creates(
    backend: VolumeBackend, count: int, size_gib: int, *, prefix: str = "bench"
) -> CreateTiming:
    """Create `count` volumes of size_gib, measure, then delete them."""
    run = secrets.token_hex(3)
    ids = [f"{prefix}-{run}-{i}" for i in range(count)]
    started = time.perf_counter()
    infos = [backend.create_volume(i, size_gib) for i in ids]
    seconds = time.perf_counter() - started
    allocated = sum(v.allocated_bytes or 0 for v in infos)
    for i in ids:
        backend.delete_volume(i)
    return CreateTiming(count, size_gib, seconds, seconds / count * 1000, allocated)


def wipe_vs_dd(runner: Runner, directory: str, size_mib: int) -> WipeComparison:
    """Secure wipe of a fully written file next to `dd if=/dev/zero
    of=FILE bs=1M count=N oflag=direct` of the same size in the same place."""
    run = secrets.token_hex(3)
    victim = os.path.join(directory, f".bench-wipe-{run}")
    dd_target = os.path.join(directory, f".bench-dd-{run}")
    try:
        _fill(victim, size_mib)
        started = time.perf_counter()
        sparse.zero_fill(victim)
        wipe_seconds = time.perf_counter() - started
        started = time.perf_counter()
        runner(
            [
                "dd",
                "if=/dev/zero",
                f"of={dd_target}",
                "bs=1M",
                f"count={size_mib}",
                "oflag=direct",
                "status=none",
            ],
            timeout=None,
        )
        dd_seconds = time.perf_counter() - started
    finally:
        for p in (victim, dd_target):
            if os.path.exists(p):
                os.unlink(p)
    return WipeComparison(size_mib, wipe_seconds, dd_seconds)


def _fill(path: str, size_mib: int) -> None:
    """Allocate and write every block, so the wipe has it all to overwrite."""
    block = os.urandom(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for i in range(size_mib):
            os.pwrite(fd, block, i * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
