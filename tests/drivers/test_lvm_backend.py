"""The LVM backend against a real volume group on a loop device.

pvcreate/vgcreate/vgs/lvs work without device-mapper, so listing and stats
run everywhere; making LVs needs device-mapper and is skipped, with the
tools' own reason, on nodes without it (the project machines).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes.base import GIB, MIB, VolumeBusy
from nubes.drivers.volumes.lvm import LvmBackend, detect_lvm


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def volume_group(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "pv.img"
    with open(image, "wb") as f:
        f.truncate(1 * GIB + 64 * MIB)
    attach = run("losetup", "--find", "--show", str(image))
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    vg = f"nubes-test-{uuid.uuid4().hex[:8]}"
    try:
        for argv in (("pvcreate", "-y", device), ("vgcreate", vg, device)):
            done = run(*argv)
            assert done.returncode == 0, done.stderr
        yield vg
    finally:
        run("vgremove", "-f", vg)
        run("pvremove", "-y", device)
        run("losetup", "-d", device)
        image.unlink()
    assert vg not in run("vgs", "--noheadings", "-o", "vg_name").stdout
    assert str(image) not in run("losetup", "-a").stdout


def test_stats_and_listing_of_a_real_volume_group(volume_group: str) -> None:
    backend = LvmBackend(SubprocessRunner(), volume_group)
    stats = backend.pool_stats()
    assert stats.pool_name == volume_group
    assert 0.9 < stats.total_gib <= 1.1
    assert stats.free_gib == stats.total_gib
    assert (stats.provisioned_gib, stats.total_volumes) == (0, 0)
    assert backend.list_volumes() == []
    assert backend.list_snapshots() == []
    backend.delete_volume("never-made")  # gone already: succeeds


def test_volume_lifecycle_where_device_mapper_works(volume_group: str) -> None:
    support = detect_lvm(SubprocessRunner())
    if not support.usable:
        pytest.skip(f"LVs cannot be created on this node: {support.reason}")
    backend = LvmBackend(SubprocessRunner(), volume_group)
    vol = backend.create_volume("life", 1)
    assert os.path.exists(vol.path)
    fd = os.open(vol.path, os.O_WRONLY)
    os.pwrite(fd, b"\x77" * 4096, 0)
    os.fsync(fd)
    os.close(fd)
    snap = backend.create_snapshot("life-s", "life")
    with pytest.raises(VolumeBusy):
        backend.delete_volume("life")
    with open(snap.path, "rb") as f:
        assert f.read(4096) == b"\x77" * 4096
    backend.delete_snapshot("life-s")
    backend.delete_volume("life")
    assert backend.list_volumes() == []
