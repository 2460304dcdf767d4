"""Header inspection against files made by the real qemu-img (and a few
hand-crafted hostile ones qemu-img would never write)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nubes.drivers.images.inspect import (
    QCOW2_EXTERNAL_DATA,
    AmbiguousFormat,
    BackingFileRejected,
    DataFileRejected,
    EncryptedImageRejected,
    FormatMismatch,
    FormatNotAllowed,
    ImageFormat,
    ImageUnreadable,
    MalformedImage,
    UnsupportedFeature,
    check_safe,
    cross_check,
    inspect_image,
    qemu_img_info,
    verify_image,
)
from nubes.drivers.runner import RecordingRunner, SubprocessRunner

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qemu_img(*args: str) -> None:
    for _ in range(5):
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        # LUKS key set-up times its PBKDF on the thread's CPU clock and gives
        # up now and then on a loaded 2-core machine; it is not what is tested.
        if done.returncode == 0 or "accurate CPU usage" not in done.stderr:
            break
    if done.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)}: {done.stderr}")


def make(tmp_path: Path, name: str, fmt: str, size: str = "4M", *opts: str) -> str:
    path = str(tmp_path / name)
    qemu_img("create", "-q", "-f", fmt, *opts, path, size)
    return path


def test_raw_is_raw_with_its_file_size(tmp_path: Path) -> None:
    path = make(tmp_path, "disk.raw", "raw", "3M")
    info = verify_image(path, "raw")
    assert (info.format, info.virtual_size, info.file_size) == ("raw", 3 * 2**20, 3 * 2**20)
    assert info.partition_table is None


def test_qcow2_reports_version_size_and_cluster(tmp_path: Path) -> None:
    v3 = verify_image(make(tmp_path, "v3.qcow2", "qcow2", "10M"), "qcow2")
    assert (v3.version, v3.virtual_size, v3.cluster_size) == (3, 10 * 2**20, 65536)
    v2 = inspect_image(make(tmp_path, "v2.qcow2", "qcow2", "5M", "-o", "compat=0.10"))
    assert (v2.format, v2.version, v2.virtual_size) == (ImageFormat.QCOW2, 2, 5 * 2**20)
    check_safe(v2)


def test_qcow2_with_backing_file_is_rejected_naming_it(tmp_path: Path) -> None:
    path = make(tmp_path, "b.qcow2", "qcow2", "1M", "-F", "raw", "-b", "/etc/hostname")
    info = inspect_image(path)
    assert info.backing_file == "/etc/hostname"
    with pytest.raises(BackingFileRejected, match="/etc/hostname"):
        verify_image(path, "qcow2")


def test_qcow2_with_external_data_file_is_rejected(tmp_path: Path) -> None:
    path = make(tmp_path, "df.qcow2", "qcow2", "4M", "-o", f"data_file={tmp_path / 'data.raw'}")
    info = inspect_image(path)
    assert info.data_file == str(tmp_path / "data.raw")
    with pytest.raises(DataFileRejected, match="external data file"):
        verify_image(path, "qcow2")


def test_qcow2_data_file_bit_without_the_extension_is_still_rejected(tmp_path: Path) -> None:
    path = make(tmp_path, "bit.qcow2", "qcow2")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", QCOW2_EXTERNAL_DATA))
    assert inspect_image(path).data_file == ""
    with pytest.raises(DataFileRejected):
        verify_image(path, "qcow2")


def test_qcow2_unknown_incompatible_feature_is_rejected(tmp_path: Path) -> None:
    path = make(tmp_path, "unk.qcow2", "qcow2")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(UnsupportedFeature, match="0x10000000000"):
        verify_image(path, "qcow2")


def test_encrypted_qcow2_and_luks_are_rejected(tmp_path: Path) -> None:
    secret = ["--object", "secret,id=s0,data=pw"]
    enc = make(
        tmp_path,
        "enc.qcow2",
        "qcow2",
        "4M",
        *secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
    )
    assert inspect_image(enc).encrypted
    with pytest.raises(EncryptedImageRejected):
        verify_image(enc, "qcow2")
    luks = make(tmp_path, "x.luks", "luks", "4M", *secret, "-o", "key-secret=s0")
    assert inspect_image(luks).format == ImageFormat.LUKS
    with pytest.raises(EncryptedImageRejected):
        check_safe(inspect_image(luks))


@pytest.mark.parametrize(
    ("fmt", "opts", "expected"),
    [
        ("vmdk", (), ImageFormat.VMDK),
        ("vmdk", ("-o", "subformat=streamOptimized"), ImageFormat.VMDK),
        ("vpc", (), ImageFormat.VPC),
        ("vpc", ("-o", "subformat=fixed"), ImageFormat.VPC),
        ("vhdx", (), ImageFormat.VHDX),
        ("vdi", (), ImageFormat.VDI),
        ("qed", (), ImageFormat.QED),
        ("parallels", (), ImageFormat.PARALLELS),
    ],
)
def test_other_formats_are_detected_and_refused_when_declared_otherwise(
    tmp_path: Path, fmt: str, opts: tuple[str, ...], expected: ImageFormat
) -> None:
    path = make(tmp_path, f"x.{fmt}", fmt, "4M", *opts)
    info = inspect_image(path)
    assert info.format == expected
    check_safe(info)
    with pytest.raises(FormatMismatch, match=f"declared format raw but the data is {expected}"):
        verify_image(path, "raw")
    with pytest.raises(FormatNotAllowed):
        verify_image(path, str(expected))
    if info.virtual_size is not None:
        assert info.virtual_size == qemu_img_info(SubprocessRunner(), path, fmt).virtual_size


def test_qcow2_declared_as_raw_is_a_mismatch(tmp_path: Path) -> None:
    path = make(tmp_path, "q.qcow2", "qcow2")
    with pytest.raises(FormatMismatch) as e:
        verify_image(path, "raw")
    assert e.value.actual == ImageFormat.QCOW2
    assert "declared format raw but the data is qcow2" in str(e.value)


def test_raw_declared_as_qcow2_is_a_mismatch(tmp_path: Path) -> None:
    with pytest.raises(FormatMismatch):
        verify_image(make(tmp_path, "r.raw", "raw"), "qcow2")


def test_vmdk_with_extent_in_another_file_is_rejected(tmp_path: Path) -> None:
    flat = make(tmp_path, "flat.vmdk", "vmdk", "1M", "-o", "subformat=monolithicFlat")
    info = inspect_image(flat)
    assert info.external_extents == ("flat-flat.vmdk",)
    with pytest.raises(DataFileRejected, match=r"flat-flat\.vmdk"):
        check_safe(info)


def test_hand_written_vmdk_descriptor_pointing_at_host_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.vmdk"
    path.write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "/etc/shadow" 0\n'
    )
    with pytest.raises(DataFileRejected, match="/etc/shadow"):
        check_safe(inspect_image(str(path)))


def test_qcow2_header_inside_an_iso_is_ambiguous(tmp_path: Path) -> None:
    iso = tmp_path / "x.iso"
    subprocess.run(["genisoimage", "-quiet", "-o", str(iso), "/etc/hostname"], check=True)
    assert inspect_image(str(iso)).format == ImageFormat.ISO
    q = make(tmp_path, "q.qcow2", "qcow2")
    data = bytearray(iso.read_bytes())
    data[:512] = Path(q).read_bytes()[:512]  # the system area is free for anything
    iso.write_bytes(bytes(data))
    with pytest.raises(AmbiguousFormat, match="iso, qcow2"):
        inspect_image(str(iso))


def test_raw_with_vhd_footer_at_the_end_is_ambiguous_with_qcow2(tmp_path: Path) -> None:
    path = make(tmp_path, "q.qcow2", "qcow2")
    with open(path, "ab") as f:
        f.write(b"conectix" + b"\0" * 504)
    with pytest.raises(AmbiguousFormat):
        inspect_image(path)


def test_mbr_and_gpt_disks_are_raw(tmp_path: Path) -> None:
    mbr = tmp_path / "mbr.raw"
    mbr.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 1024)
    assert inspect_image(str(mbr)).partition_table == "mbr"
    gpt = tmp_path / "gpt.raw"
    gpt.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"EFI PART" + b"\0" * 1016)
    info = verify_image(str(gpt), "raw")
    assert (info.format, info.partition_table) == ("raw", "gpt")


def test_truncated_and_nonsense_qcow2_headers_are_malformed(tmp_path: Path) -> None:
    short = tmp_path / "short.qcow2"
    short.write_bytes(b"QFI\xfb\0\0\0\x03")
    with pytest.raises(MalformedImage, match="truncated"):
        inspect_image(str(short))
    bad = make(tmp_path, "bad.qcow2", "qcow2")
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 40))  # cluster_bits
    with pytest.raises(MalformedImage, match="cluster_bits 40"):
        inspect_image(bad)


def test_qed_with_backing_file_is_rejected(tmp_path: Path) -> None:
    path = make(tmp_path, "b.qed", "qed", "1M", "-F", "raw", "-b", "/etc/hostname")
    with pytest.raises(BackingFileRejected, match="/etc/hostname"):
        check_safe(inspect_image(path))


def test_differencing_vhd_is_rejected(tmp_path: Path) -> None:
    path = make(tmp_path, "d.vpc", "vpc", "4M")
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">I", 4))  # disk type: differencing
    with pytest.raises(BackingFileRejected, match="differencing"):
        check_safe(inspect_image(path))


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ImageUnreadable, match="cannot be read"):
        inspect_image(str(tmp_path / "nope"))


def test_qemu_img_info_always_passes_the_format_and_limits(tmp_path: Path) -> None:
    path = make(tmp_path, "q.qcow2", "qcow2", "8M")
    runner = RecordingRunner()
    runner.answers["prlimit"] = (
        '{"format": "qcow2", "virtual-size": 8388608, "actual-size": 200000}'
    )
    qemu = cross_check(runner, inspect_image(path))
    assert qemu.virtual_size == 8 * 2**20
    (argv,) = runner.calls
    assert argv[:4] == ["prlimit", "--as=1073741824", "--cpu=30", "--"]
    assert argv[argv.index("-f") + 1] == "qcow2"


def test_cross_check_disagreement_is_refused(tmp_path: Path) -> None:
    path = make(tmp_path, "q.qcow2", "qcow2", "8M")
    runner = RecordingRunner(answers={"prlimit": '{"format": "qcow2", "virtual-size": 1}'})
    with pytest.raises(MalformedImage, match="from qemu-img"):
        cross_check(runner, inspect_image(path))
    runner = RecordingRunner(
        answers={
            "prlimit": '{"format": "qcow2", "virtual-size": 8388608,'
            ' "format-specific": {"type": "qcow2", "data": {"data-file": "/dev/sda"}}}'
        }
    )
    with pytest.raises(DataFileRejected, match="/dev/sda"):
        cross_check(runner, inspect_image(path))


def test_cross_check_with_real_qemu_img(tmp_path: Path) -> None:
    run = SubprocessRunner()
    for fmt in ("raw", "qcow2"):
        path = make(tmp_path, f"d.{fmt}", fmt, "6M")
        qemu = cross_check(run, verify_image(path, fmt))
        assert (qemu.format, qemu.virtual_size) == (fmt, 6 * 2**20)


def test_raw_of_odd_size_agrees_with_qemu_in_whole_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"x" * 1000)
    info = verify_image(str(path), "raw")
    assert info.virtual_size == 1000
    assert cross_check(SubprocessRunner(), info).virtual_size == 1024
