"""Backups of real file volumes into a real backup-store directory."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.drivers.backup.posix import (
    BackupError,
    BackupInUse,
    Compression,
    CorruptBackup,
    PosixBackupStore,
)
from nubes.drivers.backup.workflow import backup_volume, restore_to_new_volume
from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes import sparse
from nubes.drivers.volumes.base import MIB, NotFound
from nubes.drivers.volumes.file import FileBackend
from tests.drivers.storage_helpers import write_at

CHUNK = 1 * MIB


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[FileBackend]:
    backend = FileBackend(SubprocessRunner(), tmp_path / "pool")
    yield backend
    for snap in backend.list_snapshots():
        backend.delete_snapshot(snap.id)
    for vol in backend.list_volumes():
        backend.delete_volume(vol.id)
    assert [p for p in (tmp_path / "pool").rglob("*") if p.is_file()] == []


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PosixBackupStore]:
    s = PosixBackupStore(tmp_path / "backups", chunk_size=CHUNK)
    yield s
    for b in reversed(s.list_backups()):
        s.delete_backup(b.backup_id)
    assert list((tmp_path / "backups").iterdir()) == []


def compressible(n: int) -> bytes:
    """Unique per call, yet shrinks under zlib (random text repeated)."""
    return (os.urandom(4096) * (n // 4096 + 1))[:n]


def digest(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.path.getsize(path)
        while left > 0:
            block = f.read(min(8 * MIB, left))
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def objects(store: PosixBackupStore, backup_id: str) -> list[Path]:
    return sorted((store.root / backup_id).glob("chunk-*"))


def test_full_and_incremental_restore_byte_identical(
    pool: FileBackend, store: PosixBackupStore
) -> None:
    vol = pool.create_volume("data", 1)
    for i in range(12):  # 12 scattered chunks of data, the rest holes
        data = os.urandom(CHUNK // 2) if i % 2 else compressible(CHUNK // 2)
        write_at(vol.path, i * 37 * MIB, data)
    at_full = digest(vol.path)

    full = backup_volume(pool, store, backup_id="b-full", volume_id="data")
    assert (full.parent_id, full.chunks, full.data_chunks) == (None, 1024, 12)
    assert full.chunks_stored == 12
    # Compressible chunks are stored compressed, random ones as they are.
    kinds = sorted(p.suffix for p in objects(store, "b-full"))
    assert kinds == [".none"] * 6 + [".zlib"] * 6
    assert pool.list_snapshots() == []  # the temporary snapshot is gone

    write_at(vol.path, 5 * MIB, os.urandom(1000))  # a hole becomes data
    write_at(vol.path, 37 * MIB + 4096, os.urandom(100))  # one chunk changes
    write_at(vol.path, 74 * MIB, bytes(CHUNK))  # one chunk becomes zeros
    at_incr = digest(vol.path)
    incr = backup_volume(pool, store, backup_id="b-incr", volume_id="data", incremental=True)
    assert incr.parent_id == "b-full"
    assert incr.chunks_stored == 2
    assert incr.data_chunks == 12
    assert len(objects(store, "b-incr")) == 2
    assert incr.stored_bytes < full.stored_bytes

    restored, result = restore_to_new_volume(pool, store, backup_id="b-incr", volume_id="r-incr")
    assert digest(restored.path) == at_incr
    assert result.chunks_restored == 12
    restored_full, _ = restore_to_new_volume(pool, store, backup_id="b-full", volume_id="r-full")
    assert digest(restored_full.path) == at_full
    # Restoring keeps the new volume thin: only data chunks were written.
    assert sparse.allocated_bytes(restored.path) <= 13 * CHUNK

    assert store.latest_backup("data") == store.get_backup("b-incr")
    assert backup_volume(pool, store, backup_id="b-incr", volume_id="data") == incr


def test_a_backup_survives_its_volume(pool: FileBackend, store: PosixBackupStore) -> None:
    vol = pool.create_volume("doomed", 1)
    write_at(vol.path, 100 * MIB, os.urandom(3 * CHUNK))
    before = digest(vol.path)
    backup_volume(pool, store, backup_id="keep", volume_id="doomed")
    pool.delete_volume("doomed")
    new, _ = restore_to_new_volume(pool, store, backup_id="keep", volume_id="reborn")
    assert digest(new.path) == before


def test_a_corrupt_chunk_fails_the_restore_naming_it(
    pool: FileBackend, store: PosixBackupStore, tmp_path: Path
) -> None:
    vol = pool.create_volume("c", 1)
    write_at(vol.path, 0, compressible(4 * CHUNK))
    backup_volume(pool, store, backup_id="base", volume_id="c")
    write_at(vol.path, 0, os.urandom(100))
    backup_volume(pool, store, backup_id="child", volume_id="c", incremental=True)

    victim = store.root / "base" / "chunk-00000002.zlib"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    target = pool.create_volume("target", 1)
    with pytest.raises(CorruptBackup) as err:
        store.restore_backup("child", target.path)
    assert (err.value.backup_id, err.value.index) == ("base", 2)
    assert "chunk 2" in str(err.value)
    assert "chunk-00000002.zlib" in str(err.value)
    with pytest.raises(CorruptBackup):
        store.verify_backup("child")

    victim.unlink()
    with pytest.raises(CorruptBackup, match="missing"):
        store.restore_backup("base", target.path)


def test_data_that_matches_its_stored_digest_but_not_its_data_digest_is_caught(
    pool: FileBackend, store: PosixBackupStore
) -> None:
    vol = pool.create_volume("m", 1)
    write_at(vol.path, 0, compressible(CHUNK))
    backup_volume(pool, store, backup_id="meta", volume_id="m")
    # Swap in another valid object *and* its stored digest: only the data digest can tell.
    obj = store.root / "meta" / "chunk-00000000.zlib"
    forged = zlib.compress(compressible(CHUNK))
    obj.write_bytes(forged)
    meta_path = store.root / "meta" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_table"][0]["stored_sha256"] = hashlib.sha256(forged).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptBackup, match="data SHA-256"):
        store.verify_backup("meta")


def test_deleting_a_parent_is_refused_while_a_child_needs_it(
    pool: FileBackend, store: PosixBackupStore
) -> None:
    vol = pool.create_volume("p", 1)
    write_at(vol.path, 0, os.urandom(CHUNK))
    backup_volume(pool, store, backup_id="p1", volume_id="p")
    backup_volume(pool, store, backup_id="p2", volume_id="p", incremental=True)
    with pytest.raises(BackupInUse, match="p2"):
        store.delete_backup("p1")
    store.delete_backup("p2")
    store.delete_backup("p1")
    store.delete_backup("p1")  # gone: fine
    assert store.list_backups() == []
    with pytest.raises(NotFound):
        store.restore_backup("p1", vol.path)


def test_an_interrupted_backup_is_invisible_and_redone(
    pool: FileBackend, store: PosixBackupStore
) -> None:
    vol = pool.create_volume("i", 1)
    write_at(vol.path, 0, os.urandom(CHUNK))
    half = store.root / "half"
    half.mkdir()
    (half / "chunk-00000000.none").write_bytes(b"partial")
    assert store.list_backups() == []
    assert store.get_backup("half") is None
    info = backup_volume(pool, store, backup_id="half", volume_id="i")
    assert info.chunks_stored == 1
    store.verify_backup("half")
    sums = (half / "SHA256SUMS").read_text().split()
    assert sums == [info_digest(store, "half"), "chunk-00000000.none"]


def info_digest(store: PosixBackupStore, backup_id: str) -> str:
    meta = json.loads((store.root / backup_id / "metadata.json").read_text())
    assert meta["format_version"] == 1
    value: str = meta["chunk_table"][0]["stored_sha256"]
    return value


@pytest.mark.parametrize("compression", list(Compression))
def test_every_compression_round_trips_an_odd_sized_file(
    tmp_path: Path, compression: Compression
) -> None:
    store = PosixBackupStore(tmp_path / "b", chunk_size=64 * 1024, compression=compression)
    source = tmp_path / "odd.img"
    payload = os.urandom(300_001) + bytes(200_000) + b"tail"
    source.write_bytes(payload)
    info = store.create_backup("odd", "vol-odd", str(source))
    assert info.size_bytes == len(payload)
    target = tmp_path / "out.img"
    target.write_bytes(b"\xee" * len(payload))  # not blank: zero chunks must be written
    store.restore_backup("odd", str(target))
    assert target.read_bytes() == payload
    small = tmp_path / "small.img"
    small.write_bytes(b"")
    with pytest.raises(BackupError, match="needs"):
        store.restore_backup("odd", str(small))
    store.delete_backup("odd")


def test_backup_memory_stays_bounded_by_the_chunk_size(tmp_path: Path) -> None:
    source = tmp_path / "big.img"
    with open(source, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * MIB))  # 256 MiB of incompressible data
    store = PosixBackupStore(tmp_path / "b", chunk_size=8 * MIB)
    tracemalloc.start()
    try:
        store.create_backup("big", "vol-big", str(source))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MIB, f"peak {peak / MIB:.0f} MiB for 8 MiB chunks"
    target = tmp_path / "out.img"
    with open(target, "wb") as f:
        f.truncate(os.path.getsize(source))
    tracemalloc.start()
    try:
        store.restore_backup("big", str(target))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MIB
    assert digest(str(target)) == digest(str(source))
    store.delete_backup("big")


def test_incremental_needs_a_parent_of_the_same_volume(tmp_path: Path) -> None:
    store = PosixBackupStore(tmp_path / "b", chunk_size=64 * 1024)
    a = tmp_path / "a.img"
    a.write_bytes(os.urandom(100_000))
    store.create_backup("a1", "vol-a", str(a))
    with pytest.raises(BackupError, match="of volume vol-a"):
        store.create_backup("b1", "vol-b", str(a), parent_id="a1")
    with pytest.raises(NotFound):
        store.create_backup("b1", "vol-b", str(a), parent_id="nope")
    store.delete_backup("a1")
