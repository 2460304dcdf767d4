"""Ids, sizes and error messages of the volume contract; backup decoding bounds."""

from __future__ import annotations

import lzma
import zlib

import pytest

from nubes.drivers.backup.posix import Compression, _decompress
from nubes.drivers.volumes.base import (
    InvalidId,
    NoSpace,
    NotFound,
    ShrinkRefused,
    StorageError,
    VolumeBusy,
    check_id,
    check_size,
)


def test_kubernetes_uids_and_simple_names_are_valid_ids() -> None:
    for good in ("5f0c6a9e-1b2d-4c3e-9f8a-7b6c5d4e3f2a", "vol1", "A.b_c-d", "x" * 100):
        assert check_id("volume", good) == good


@pytest.mark.parametrize("bad", ["", ".x", "-x", "a/b", "a b", "x" * 101, "é", "a\n"])
def test_ids_that_could_escape_a_directory_or_an_lv_name_are_refused(bad: str) -> None:
    with pytest.raises(InvalidId, match="not usable"):
        check_id("volume", bad)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_sizes_are_whole_positive_gib(bad: object) -> None:
    with pytest.raises(StorageError):
        check_size(bad)  # type: ignore[arg-type]


def test_errors_read_as_sentences_for_people() -> None:
    assert str(NotFound("volume", "v1", "pool p")) == "volume v1 does not exist in pool p"
    assert (
        str(VolumeBusy("v1", "it has snapshots: s1")) == "volume v1 is busy: it has snapshots: s1"
    )
    assert "shrinking to 1 GiB would lose data" in str(ShrinkRefused("v1", 2, 1))
    assert "needs 3.00 GiB, 1.50 GiB free" in str(NoSpace("volume v1", 3, 1.5, "p"))


def test_decompression_is_bounded_by_the_recorded_length() -> None:
    bomb = zlib.compress(bytes(64 * 1024 * 1024))  # tiny object, 64 MiB inflated
    with pytest.raises(zlib.error):
        _decompress(Compression.ZLIB, bomb, 1024)
    with pytest.raises(lzma.LZMAError):
        _decompress(Compression.LZMA, lzma.compress(bytes(1 << 20)), 1024)
    assert _decompress(Compression.ZLIB, zlib.compress(b"abc"), 3) == b"abc"
    with pytest.raises(zlib.error):
        _decompress(Compression.ZLIB, zlib.compress(b"abcdef")[:-4], 6)
