"""The file backend on a real filesystem: thin files, copies, secure wipe."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes import benchmark, sparse
from nubes.drivers.volumes.base import (
    GIB,
    MIB,
    ImageImport,
    ImageRejected,
    InvalidId,
    NoSpace,
    NotFound,
    ShrinkRefused,
    SnapshotRevert,
    VolumeBackend,
    VolumeBusy,
)
from nubes.drivers.volumes.file import FileBackend
from tests.drivers.storage_helpers import loop_filesystem, physical_extents, read_image, write_at


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[FileBackend]:
    backend = FileBackend(SubprocessRunner(), tmp_path / "pool", pool_name="test")
    yield backend
    for snap in backend.list_snapshots():
        backend.delete_snapshot(snap.id)
    for vol in backend.list_volumes():
        backend.delete_volume(vol.id)
    leftovers = [p for p in (tmp_path / "pool").rglob("*") if p.is_file()]
    assert leftovers == [], f"pool left files behind: {leftovers}"


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def holder(path: str) -> subprocess.Popen[bytes]:
    """Another process keeping the file open, as tgtd or QEMU would."""
    f = open(path, "rb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(["sleep", "30"], stdin=f)
    f.close()
    return proc


def test_the_backend_keeps_the_contract_and_both_optional_capabilities(pool: FileBackend) -> None:
    assert isinstance(pool, VolumeBackend)
    assert isinstance(pool, ImageImport)
    assert isinstance(pool, SnapshotRevert)


def test_a_fresh_10_gib_volume_allocates_nothing_and_costs_what_1_gib_does(
    pool: FileBackend,
) -> None:
    def timed(volume_id: str, size: int) -> float:
        started = time.perf_counter()
        pool.create_volume(volume_id, size)
        return time.perf_counter() - started

    small = min(timed(f"small-{i}", 1) for i in range(3))
    big = min(timed(f"big-{i}", 10) for i in range(3))
    info = pool.get_volume("big-0")
    assert info is not None
    assert os.path.getsize(info.path) == 10 * GIB
    assert sparse.allocated_bytes(info.path) <= 64 * 1024
    assert info.allocated_bytes == sparse.allocated_bytes(info.path)
    # Same work whatever the size: allow scheduling noise, not a size-proportional cost.
    assert big < max(small * 5, 0.02), (small, big)
    assert read_at(info.path, 7 * GIB, 4096) == bytes(4096)


def test_create_is_idempotent_and_ids_are_checked(pool: FileBackend) -> None:
    first = pool.create_volume("vol-a", 2)
    again = pool.create_volume("vol-a", 2)
    assert again.path == first.path
    assert [v.id for v in pool.list_volumes()] == ["vol-a"]
    for bad in ("../x", ".hidden", "a/b", "", "x" * 101):
        with pytest.raises(InvalidId):
            pool.create_volume(bad, 1)


def test_extend_grows_keeps_data_and_refuses_to_shrink(pool: FileBackend) -> None:
    vol = pool.create_volume("grow", 1)
    write_at(vol.path, 123, b"keep me")
    grown = pool.extend_volume("grow", 3)
    assert grown.size_gib == 3
    assert os.path.getsize(vol.path) == 3 * GIB
    assert read_at(vol.path, 123, 7) == b"keep me"
    assert pool.extend_volume("grow", 3).size_gib == 3
    with pytest.raises(ShrinkRefused, match="only grow"):
        pool.extend_volume("grow", 2)
    with pytest.raises(NotFound):
        pool.extend_volume("nope", 2)


def test_snapshot_and_clone_are_point_in_time_thin_copies(pool: FileBackend) -> None:
    vol = pool.create_volume("origin", 4)
    write_at(vol.path, 3 * GIB, b"before" * 1000)
    snap = pool.create_snapshot("snap-1", "origin")
    assert snap.volume_id == "origin"
    assert pool.create_snapshot("snap-1", "origin") == snap
    write_at(vol.path, 3 * GIB, b"AFTER!" * 1000)

    assert read_at(snap.path, 3 * GIB, 6) == b"before"
    # Only the written extent was copied: the 4 GiB snapshot stays thin.
    assert sparse.allocated_bytes(snap.path) <= 64 * 1024

    restored = pool.create_volume_from_snapshot("from-snap", "snap-1", size_gib=5)
    assert restored.size_gib == 5
    assert read_at(restored.path, 3 * GIB, 6) == b"before"
    clone = pool.clone_volume("clone", "origin")
    assert clone.size_gib == 4
    assert read_at(clone.path, 3 * GIB, 6) == b"AFTER!"
    with pytest.raises(ShrinkRefused):
        pool.clone_volume("tiny", "origin", size_gib=1)

    with pytest.raises(VolumeBusy, match="snapshots: snap-1"):
        pool.delete_volume("origin")
    pool.delete_snapshot("snap-1")
    pool.delete_snapshot("snap-1")  # already gone: fine
    pool.delete_volume("origin")
    assert pool.get_volume("origin") is None


def test_revert_puts_the_snapshot_data_back_in_place(pool: FileBackend) -> None:
    vol = pool.create_volume("rev", 1)
    write_at(vol.path, 0, b"v1" * 2048)
    pool.create_snapshot("rev-s", "rev")
    write_at(vol.path, 0, b"v2" * 2048)
    write_at(vol.path, 512 * MIB, b"later data")
    inode = os.stat(vol.path).st_ino
    pool.revert_to_snapshot("rev", "rev-s")
    assert os.stat(vol.path).st_ino == inode
    assert read_at(vol.path, 0, 4) == b"v1v1"
    assert read_at(vol.path, 512 * MIB, 10) == bytes(10)


def test_a_volume_open_elsewhere_is_busy_for_delete_and_extend(pool: FileBackend) -> None:
    vol = pool.create_volume("held", 1)
    proc = holder(vol.path)
    try:
        with pytest.raises(VolumeBusy, match="open by another process"):
            pool.delete_volume("held")
        with pytest.raises(VolumeBusy):
            pool.extend_volume("held", 2)
    finally:
        proc.kill()
        proc.wait()
    pool.delete_volume("held")
    pool.delete_volume("held")
    assert pool.get_volume("held") is None


def test_a_restarted_driver_re_adopts_volumes_and_snapshots(pool: FileBackend) -> None:
    pool.create_volume("keep-1", 1)
    pool.create_volume("keep-2", 2)
    pool.create_snapshot("keep-s", "keep-2")
    again = FileBackend(SubprocessRunner(), pool.root, pool_name="test")
    assert [(v.id, v.size_gib) for v in again.list_volumes()] == [("keep-1", 1), ("keep-2", 2)]
    assert [(s.id, s.volume_id) for s in again.list_snapshots()] == [("keep-s", "keep-2")]
    stats = again.pool_stats()
    assert stats.total_volumes == 2
    assert stats.provisioned_gib == 5
    assert 0 < stats.free_gib <= stats.total_gib
    assert stats.capabilities["thin_provisioning_support"] is True


@pytest.fixture
def disk_pool(tmp_path: Path) -> Iterator[tuple[FileBackend, Path]]:
    """A pool on its own loop-mounted ext4, and the image file that is its disk."""
    with loop_filesystem(tmp_path) as (mount, image):
        backend = FileBackend(SubprocessRunner(), mount / "pool")
        yield backend, image
        for vol in backend.list_volumes():
            backend.delete_volume(vol.id)


def on_disk(image: Path, extents: list[tuple[int, int, int]]) -> bytes:
    return b"".join(read_image(image, physical, length) for _, physical, length in extents)


def test_secure_delete_leaves_no_trace_of_the_data_on_the_disk(
    disk_pool: tuple[FileBackend, Path],
) -> None:
    pool, image = disk_pool
    vol = pool.create_volume("secret", 1)
    blocks = [os.urandom(4096) for _ in range(16)]
    write_at(vol.path, 256 * MIB, b"".join(blocks) * 256)  # 16 MiB in the middle
    extents = physical_extents(vol.path)
    assert sum(length for _, _, length in extents) >= 16 * MIB
    # Control: reading the disk at those places finds the data while it exists.
    before = on_disk(image, extents)
    assert all(b in before for b in blocks)

    pool.delete_volume("secret")

    after = on_disk(image, extents)
    leaked = [i for i, b in enumerate(blocks) if b in after]
    assert leaked == [], f"blocks {leaked} still on the disk after delete"
    assert after == bytes(len(after)), "the freed region was not zeroed"
    assert not os.path.exists(vol.path)


def test_an_interrupted_delete_is_finished_with_the_data_wiped(
    disk_pool: tuple[FileBackend, Path],
) -> None:
    pool, image = disk_pool
    vol = pool.create_volume("crash", 1)
    marker = os.urandom(4096)
    write_at(vol.path, 0, marker * 256)
    # What a crash between "move to .work" and "wipe" leaves behind:
    trash = pool.root / ".work" / "deleting-volume-crash.raw"
    os.link(vol.path, trash)
    os.unlink(vol.path)
    extents = physical_extents(str(trash))
    assert marker in on_disk(image, extents)
    assert pool.list_volumes() == []
    assert pool.finish_interrupted_work() == ["deleting-volume-crash.raw"]
    assert not trash.exists()
    assert marker not in on_disk(image, extents)


def test_wipe_versus_dd_helper_measures_both_and_cleans_up(tmp_path: Path) -> None:
    # The figures themselves are for `make bench-volumes`, not for assertions.
    result = benchmark.wipe_vs_dd(SubprocessRunner(), str(tmp_path), 64)
    assert result.wipe_mib_s > 0 and result.dd_mib_s > 0
    assert result.ratio == pytest.approx(result.wipe_mib_s / result.dd_mib_s)
    assert list(tmp_path.iterdir()) == []


def test_thin_create_timing_helper_reports_and_cleans_up(pool: FileBackend) -> None:
    timing = benchmark.time_thin_creates(pool, 20, 10)
    assert timing.count == 20
    assert timing.allocated_bytes <= 20 * 64 * 1024
    assert pool.list_volumes() == []


def test_image_import_converts_qcow2_and_refuses_backing_files(
    pool: FileBackend, tmp_path: Path
) -> None:
    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(image)],
        check=True,
        capture_output=True,
    )
    vol = pool.create_volume("from-image", 1)
    pool.copy_image_to_volume("from-image", str(image), "qcow2")
    assert os.path.getsize(vol.path) == GIB  # -n: the volume keeps its size
    assert read_at(vol.path, MIB, 2 * MIB) == b"\x5a" * 2 * MIB
    assert read_at(vol.path, 0, MIB) == bytes(MIB)
    assert sparse.allocated_bytes(vol.path) < 8 * MIB  # zeros skipped

    child = tmp_path / "child.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(child)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ImageRejected, match="backing file"):
        pool.copy_image_to_volume("from-image", str(child), "qcow2")
    big = tmp_path / "big.raw"
    big.write_bytes(b"")
    os.truncate(big, 2 * GIB)
    with pytest.raises(ImageRejected, match="needs"):
        pool.copy_image_to_volume("from-image", str(big), "raw")
    with pytest.raises(ImageRejected):
        pool.copy_image_to_volume("from-image", str(image), "iso")
    digest = hashlib.sha256(read_at(vol.path, 0, 4 * MIB)).hexdigest()
    assert digest == hashlib.sha256(bytes(MIB) + b"\x5a" * 2 * MIB + bytes(MIB)).hexdigest()


def test_space_limits_are_typed_errors(disk_pool: tuple[FileBackend, Path]) -> None:
    pool, _ = disk_pool
    # 256 MiB filesystem x ratio 20: about 5 GiB may be provisioned.
    with pytest.raises(NoSpace, match="volume huge"):
        pool.create_volume("huge", 6)
    vol = pool.create_volume("full", 1)
    write_at(vol.path, 0, os.urandom(150 * MIB))
    # A sparse copy needs the 150 MiB again; the filesystem has less left.
    with pytest.raises(NoSpace, match="snapshot s"):
        pool.create_snapshot("s", "full")
    assert pool.list_snapshots() == []
    assert list((pool.root / ".work").iterdir()) == []
