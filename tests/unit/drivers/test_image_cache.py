"""The node image cache with the real qemu-img, reading image-store files:
copy once, verify, inspect, store raw, overlays, snapshots, prune."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nubes.drivers.images.cache import (
    ChecksumMismatch,
    DiskConflict,
    DiskTooSmall,
    ImageCache,
    ImageFetchError,
    ImageRejected,
    ImageSource,
    InvalidImageSource,
)
from nubes.drivers.images.inspect import ImageFormat, inspect_image
from nubes.drivers.runner import Result, SubprocessRunner

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MIB = 2**20


@dataclass
class Recorder:
    """Runs commands for real and remembers them."""

    calls: list[list[str]] = field(default_factory=list)
    real: SubprocessRunner = field(default_factory=SubprocessRunner)

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 60,
        netns: str | None = None,
    ) -> Result:
        self.calls.append(list(argv))
        return self.real(argv, check=check, input=input, timeout=timeout, netns=netns)

    def qemu_img(self, verb: str) -> list[list[str]]:
        out = []
        for argv in self.calls:
            if "qemu-img" in argv and argv[argv.index("qemu-img") + 1] == verb:
                out.append(argv[argv.index("qemu-img") :])
        return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_image(tmp_path: Path, name: str = "src.raw", size: int = 2 * MIB) -> Path:
    path = tmp_path / name
    data = bytearray(size)
    data[0:6] = b"NUBES!"
    data[size // 2 : size // 2 + 4] = b"\xde\xad\xbe\xef"
    path.write_bytes(bytes(data))
    return path


def qcow2_of(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True
    )
    return out


@pytest.fixture
def runner() -> Recorder:
    return Recorder()


@pytest.fixture
def cache(tmp_path: Path, runner: Recorder) -> ImageCache:
    return ImageCache(str(tmp_path / "instances"), runner)


def leftovers(cache: ImageCache) -> list[str]:
    tmp = Path(cache.tmp_dir)
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_raw_image_from_file_url_is_stored_by_digest(
    cache: ImageCache, tmp_path: Path, runner: Recorder
) -> None:
    src = raw_image(tmp_path)
    image = cache.ensure_image(ImageSource(str(src), sha(src), "raw"))
    assert image.path == os.path.join(cache.root, "_base", sha(src))
    assert Path(image.path).read_bytes() == src.read_bytes()
    assert (image.virtual_size, image.source_format) == (2 * MIB, ImageFormat.RAW)
    # Guest data: root and QEMU's group only (nubes.drivers.hostfiles).
    assert os.stat(image.path).st_mode & 0o777 == 0o640
    assert os.stat(os.path.dirname(image.path)).st_mode & 0o777 == 0o750
    assert runner.qemu_img("convert") == []
    assert leftovers(cache) == []
    # Every qemu-img call named its format.
    assert all("-f" in argv for argv in runner.qemu_img("info"))


def test_qcow2_image_is_converted_to_raw(
    cache: ImageCache, tmp_path: Path, runner: Recorder
) -> None:
    raw = raw_image(tmp_path)
    src = qcow2_of(raw)
    image = cache.ensure_image(ImageSource(str(src), sha(src), "qcow2"))
    assert image.source_format == ImageFormat.QCOW2
    assert inspect_image(image.path).format == ImageFormat.RAW
    assert Path(image.path).read_bytes() == raw.read_bytes()
    (convert,) = runner.qemu_img("convert")
    assert convert[:6] == ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
    assert leftovers(cache) == []


def test_second_ensure_is_a_cache_hit(cache: ImageCache, tmp_path: Path, runner: Recorder) -> None:
    src = qcow2_of(raw_image(tmp_path))
    source = ImageSource(str(src), sha(src), "qcow2")
    first = cache.ensure_image(source)
    calls = len(runner.calls)
    src.unlink()  # a hit must not even look at the source
    assert cache.ensure_image(source) == first
    assert len(runner.calls) == calls


def test_checksum_mismatch_stores_nothing(cache: ImageCache, tmp_path: Path) -> None:
    src = raw_image(tmp_path)
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as e:
        cache.ensure_image(ImageSource(str(src), wrong, "raw"))
    assert e.value.actual == sha(src)
    assert wrong in str(e.value)
    assert sha(src) not in str(e.value), "the digest of rejected data is not disclosed"
    assert cache.cached(wrong) is None
    assert leftovers(cache) == []


def test_declared_raw_but_qcow2_is_rejected(cache: ImageCache, tmp_path: Path) -> None:
    src = qcow2_of(raw_image(tmp_path))
    with pytest.raises(ImageRejected) as e:
        cache.ensure_image(ImageSource(str(src), sha(src), "raw"))
    assert e.value.reason == "FormatMismatch"
    assert str(src) in str(e.value)
    assert cache.cached(sha(src)) is None
    assert leftovers(cache) == []


def test_qcow2_with_backing_file_is_rejected(cache: ImageCache, tmp_path: Path) -> None:
    src = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(src)],
        check=True,
    )
    with pytest.raises(ImageRejected, match="backing file") as e:
        cache.ensure_image(ImageSource(str(src), sha(src), "qcow2"))
    assert e.value.reason == "BackingFileRejected"
    assert leftovers(cache) == []


def test_bad_sources_are_refused_before_reading(cache: ImageCache, tmp_path: Path) -> None:
    with pytest.raises(InvalidImageSource, match="not an absolute path"):
        cache.ensure_image(ImageSource("http://127.0.0.1/x", "a" * 64, "raw"))
    with pytest.raises(InvalidImageSource, match="SHA-256"):
        cache.ensure_image(ImageSource("/x", "A" * 64, "raw"))
    with pytest.raises(ImageFetchError, match="cannot read"):
        cache.ensure_image(ImageSource(str(tmp_path / "missing"), "a" * 64, "raw"))
    assert leftovers(cache) == []


def test_concurrent_callers_copy_and_convert_once(
    cache: ImageCache, tmp_path: Path, runner: Recorder
) -> None:
    src = qcow2_of(raw_image(tmp_path, "img.raw", 8 * MIB))
    source = ImageSource(str(src), sha(src), "qcow2")
    results: list[str] = []
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            results.append(cache.ensure_image(source).path)
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 4
    assert len(runner.qemu_img("convert")) == 1


def test_instance_disk_is_an_overlay_grown_to_the_flavor(
    cache: ImageCache, tmp_path: Path, runner: Recorder
) -> None:
    src = raw_image(tmp_path)
    image = cache.ensure_image(ImageSource(str(src), sha(src), "raw"))
    disk = str(tmp_path / "instances" / "uid-1" / "disk")
    info = cache.ensure_instance_disk(image, disk, 8 * MIB)
    assert (info.virtual_size, info.backing_file) == (8 * MIB, image.path)
    (create,) = runner.qemu_img("create")
    assert create[create.index("-f") + 1] == "qcow2"
    assert create[create.index("-F") + 1] == "raw"
    inspected = inspect_image(disk)
    assert (inspected.format, inspected.backing_file) == (ImageFormat.QCOW2, image.path)
    # Idempotent: nothing is re-created; a bigger flavor grows it in place.
    assert cache.ensure_instance_disk(image, disk, 8 * MIB).virtual_size == 8 * MIB
    assert len(runner.qemu_img("create")) == 1
    assert cache.ensure_instance_disk(image, disk, 16 * MIB).virtual_size == 16 * MIB
    assert cache.disk_info(disk).virtual_size == 16 * MIB
    (resize,) = runner.qemu_img("resize")
    assert resize[resize.index("-f") + 1] == "qcow2"
    with pytest.raises(DiskTooSmall, match="only grow"):
        cache.grow_disk(disk, 4 * MIB)
    with pytest.raises(DiskTooSmall):
        cache.ensure_instance_disk(image, str(tmp_path / "small"), MIB)
    # Default size: the image's.
    assert cache.ensure_instance_disk(image, str(tmp_path / "d2")).virtual_size == 2 * MIB
    cache.delete_disk(disk)
    cache.delete_disk(disk)
    assert not os.path.exists(disk)


def test_a_foreign_file_where_the_disk_should_be_is_a_conflict(
    cache: ImageCache, tmp_path: Path
) -> None:
    src = raw_image(tmp_path)
    image = cache.ensure_image(ImageSource(str(src), sha(src), "raw"))
    other = tmp_path / "disk"
    other.write_bytes(b"\0" * 1024)
    with pytest.raises(DiskConflict, match="not an overlay"):
        cache.ensure_instance_disk(image, str(other))


def test_snapshot_flattens_overlay_and_base(
    cache: ImageCache, tmp_path: Path, runner: Recorder
) -> None:
    src = raw_image(tmp_path)
    image = cache.ensure_image(ImageSource(str(src), sha(src), "raw"))
    disk = str(tmp_path / "disk")
    cache.ensure_instance_disk(image, disk, 4 * MIB)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 3M 64k", disk],
        check=True,
        capture_output=True,
    )
    snap = cache.snapshot_disk(disk, str(tmp_path / "snap" / "s.qcow2"))
    info = inspect_image(snap.path)
    assert (info.format, info.backing_file, snap.virtual_size) == ("qcow2", None, 4 * MIB)
    assert snap.sha256 == sha(Path(snap.path))
    (convert,) = runner.qemu_img("convert")[-1:]
    assert convert[:6] == ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2"]
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", disk, snap.path],
        capture_output=True,
    )
    assert same.returncode == 0, same.stdout
    # Repeating returns the same file without converting again.
    converts = len(runner.qemu_img("convert"))
    assert cache.snapshot_disk(disk, snap.path) == snap
    assert len(runner.qemu_img("convert")) == converts


def test_prune_removes_only_unused_images(cache: ImageCache, tmp_path: Path) -> None:
    a = raw_image(tmp_path, "a.raw", MIB)
    b = raw_image(tmp_path, "b.raw", 2 * MIB)
    ia = cache.ensure_image(ImageSource(str(a), sha(a), "raw"))
    ib = cache.ensure_image(ImageSource(str(b), sha(b), "raw"))
    assert cache.prune([ia.sha256, ib.sha256]) == []
    assert cache.prune([ia.sha256], min_unused_seconds=3600) == []  # b was just used
    assert cache.prune([ia.sha256]) == [ib.sha256]
    assert not os.path.exists(ib.path) and not os.path.exists(ib.path + ".json")
    assert cache.cached(ia.sha256) == ia
    assert sorted(os.listdir(cache.base_dir)) == sorted(
        [".locks", ".tmp", ia.sha256, ia.sha256 + ".json"]
    )
    assert cache.prune([]) == [ia.sha256]
    assert cache.prune([]) == []


def test_prune_skips_an_image_being_fetched(cache: ImageCache, tmp_path: Path) -> None:
    a = raw_image(tmp_path, "a.raw", MIB)
    ia = cache.ensure_image(ImageSource(str(a), sha(a), "raw"))
    with cache._lock(ia.sha256) as held:
        assert held
        assert cache.prune([]) == []
    assert cache.prune([]) == [ia.sha256]
