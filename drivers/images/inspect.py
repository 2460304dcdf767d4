"""Read an image's headers in pure Python before any qemu-img call.

qemu-img trusts what a header says: a qcow2 backing file or external data
file, a vmdk extent or a VHD parent can name any host file, and a file that
is both an ISO and a qcow2 is read as whichever `-f` says (the CVE-2024-32498
class). So the node first identifies the format from magic numbers itself,
rejects an image whose actual format is not the declared one, whose format
matches more than one signature, or whose metadata points outside the file,
and only then lets qemu-img near it, always with an explicit `-f`.
`qemu_img_info` is the cross-check afterwards.

(About 570 lines: one header parser per image format, kept together so the
cross-format checks see them all.)
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, BinaryIO, Literal

from nubes.drivers.problem import Failure
from nubes.drivers.runner import CommandError, Runner


class ImageFormat(StrEnum):
    """Formats by qemu's driver name, plus `iso` (raw to qemu, but not a disk)."""

    RAW = "raw"
    QCOW2 = "qcow2"
    QCOW = "qcow"
    QED = "qed"
    VMDK = "vmdk"
    VPC = "vpc"
    VHDX = "vhdx"
    VDI = "vdi"
    LUKS = "luks"
    ISO = "iso"
    PARALLELS = "parallels"
    DMG = "dmg"
    CLOOP = "cloop"
    BOCHS = "bochs"


# What an image import accepts unless the caller says otherwise.
DEFAULT_ALLOWED: frozenset[ImageFormat] = frozenset({ImageFormat.RAW, ImageFormat.QCOW2})

# qemu-img info runs under these limits (as Cinder and Nova do): a crafted
# header must not make it eat the node's memory or CPU.
QEMU_IMG_LIMITS = ("prlimit", "--as=1073741824", "--cpu=30", "--")


class ImageInspectionError(Failure):
    """Base of every refusal; `str(e)` names the file and the problem."""

    reason = "ImageRejected"
    retryable = False

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"image {path}: {problem}")


class ImageUnreadable(ImageInspectionError):
    reason = "ImageUnreadable"


class MalformedImage(ImageInspectionError):
    reason = "MalformedImage"


class AmbiguousFormat(ImageInspectionError):
    reason = "AmbiguousFormat"


class FormatMismatch(ImageInspectionError):
    reason = "FormatMismatch"

    def __init__(self, path: str, declared: str, actual: ImageFormat) -> None:
        self.declared = declared
        self.actual = actual
        super().__init__(path, f"declared format {declared} but the data is {actual}")


class FormatNotAllowed(ImageInspectionError):
    reason = "FormatNotAllowed"


class BackingFileRejected(ImageInspectionError):
    reason = "BackingFileRejected"


class DataFileRejected(ImageInspectionError):
    reason = "ExternalDataFileRejected"


class EncryptedImageRejected(ImageInspectionError):
    reason = "EncryptedImageRejected"


class UnsupportedFeature(ImageInspectionError):
    reason = "UnsupportedFeature"


@dataclass(frozen=True)
class ImageInfo:
    """What the headers say. `virtual_size` is None where the format's size
    is not parsed here (qemu_img_info then supplies it)."""

    path: str
    format: ImageFormat
    file_size: int
    virtual_size: int | None
    version: int | None = None
    cluster_size: int | None = None
    backing_file: str | None = None
    """Backing file (qcow2/qcow/qed) or parent (differencing VHD) named by the header."""
    data_file: str | None = None
    """qcow2 external data file name; "" when the feature bit is set without a name."""
    encrypted: bool = False
    external_extents: tuple[str, ...] = ()
    """vmdk extents (or a descriptor-only vmdk's files) outside this file."""
    unknown_features: int = 0
    """qcow2 incompatible feature bits this inspector does not know."""
    corrupt: bool = False
    partition_table: Literal["mbr", "gpt"] | None = None


# --- detection ----------------------------------------------------------------

QCOW_MAGIC = b"QFI\xfb"
QED_MAGIC = b"QED\x00"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK_COWD_MAGIC = b"COWD"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
VHD_COOKIE = b"conectix"
VHDX_MAGIC = b"vhdxfile"
VDI_SIGNATURE = 0xBEDA107F
LUKS_MAGIC = b"LUKS\xba\xbe"
ISO_OFFSETS = (0x8001, 0x8801, 0x9001)  # "CD001" in the first volume descriptors
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
DMG_MAGIC = b"koly"
CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop"
BOCHS_MAGIC = b"Bochs Virtual HD Image"

HEAD = 64 * 1024  # covers every magic above and the ISO volume descriptors
MAX_QCOW2_CLUSTER = 2 * 1024 * 1024


def _matches(head: bytes, tail: bytes) -> list[ImageFormat]:
    found: list[ImageFormat] = []
    if head.startswith(QCOW_MAGIC) and len(head) >= 8:
        version = struct.unpack_from(">I", head, 4)[0]
        found.append(ImageFormat.QCOW if version == 1 else ImageFormat.QCOW2)
    if head.startswith(QED_MAGIC):
        found.append(ImageFormat.QED)
    if head.startswith((VMDK_SPARSE_MAGIC, VMDK_COWD_MAGIC, VMDK_DESCRIPTOR)):
        found.append(ImageFormat.VMDK)
    if head.startswith(VHD_COOKIE) or tail[-512:].startswith(VHD_COOKIE):
        found.append(ImageFormat.VPC)
    if head.startswith(VHDX_MAGIC):
        found.append(ImageFormat.VHDX)
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        found.append(ImageFormat.VDI)
    if head.startswith(LUKS_MAGIC):
        found.append(ImageFormat.LUKS)
    if any(head[o : o + 5] == b"CD001" for o in ISO_OFFSETS):
        found.append(ImageFormat.ISO)
    if head.startswith(PARALLELS_MAGICS):
        found.append(ImageFormat.PARALLELS)
    if len(tail) >= 512 and tail[-512:].startswith(DMG_MAGIC):
        found.append(ImageFormat.DMG)
    if head.startswith(CLOOP_MAGIC):
        found.append(ImageFormat.CLOOP)
    if head.startswith(BOCHS_MAGIC):
        found.append(ImageFormat.BOCHS)
    return found


def inspect_image(path: str) -> ImageInfo:
    """Identify the format and read the metadata that matters for safety.

    Raises ImageUnreadable, AmbiguousFormat (more than one format's signature)
    or MalformedImage (a header that contradicts itself); an image that is
    well-formed but unsafe is returned as such: `check_safe` judges it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEAD)
            tail = b""
            if size >= 512:
                f.seek(size - 512)
                tail = f.read(512)
            found = _matches(head, tail)
            if len(found) > 1:
                names = ", ".join(sorted(found))
                raise AmbiguousFormat(path, f"matches the signatures of several formats ({names})")
            fmt = found[0] if found else ImageFormat.RAW
            parser = _PARSERS.get(fmt)
            if parser is not None:
                return parser(path, f, head, tail, size)
            return ImageInfo(
                path=path,
                format=fmt,
                file_size=size,
                virtual_size=size if fmt in (ImageFormat.RAW, ImageFormat.ISO) else None,
                partition_table=_partition_table(head),
            )
    except OSError as e:
        raise ImageUnreadable(path, f"cannot be read: {e.strerror or e}") from e


def _partition_table(head: bytes) -> Literal["mbr", "gpt"] | None:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None
    if len(head) >= 520 and head[512:520] == b"EFI PART":
        return "gpt"
    return "mbr"


# qcow2 incompatible feature bits (docs/interop/qcow2.txt)
QCOW2_DIRTY = 1 << 0
QCOW2_CORRUPT = 1 << 1
QCOW2_EXTERNAL_DATA = 1 << 2
QCOW2_COMPRESSION_TYPE = 1 << 3
QCOW2_EXTENDED_L2 = 1 << 4
QCOW2_KNOWN_INCOMPATIBLE = (
    QCOW2_DIRTY | QCOW2_CORRUPT | QCOW2_EXTERNAL_DATA | QCOW2_COMPRESSION_TYPE | QCOW2_EXTENDED_L2
)
QCOW2_EXT_END = 0x00000000
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_EXT_ENCRYPTION = 0x0537BE77


def _parse_qcow(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    if len(head) < 72:
        raise MalformedImage(path, "qcow header is truncated")
    (
        _magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        virtual_size,
        crypt_method,
    ) = struct.unpack_from(">IIQIIQI", head, 0)
    fmt = ImageFormat.QCOW if version == 1 else ImageFormat.QCOW2
    if version == 1:
        # qcow v1: magic, version, backing offset/size, mtime, size, cluster bits...
        backing_offset, backing_size = struct.unpack_from(">QI", head, 8)
        virtual_size = struct.unpack_from(">Q", head, 24)[0]
        crypt_method = struct.unpack_from(">I", head, 36)[0]
        backing = _read_string(path, f, backing_offset, backing_size) if backing_offset else None
        return ImageInfo(
            path=path,
            format=fmt,
            file_size=size,
            virtual_size=virtual_size,
            version=1,
            backing_file=backing,
            encrypted=crypt_method != 0,
        )
    if version not in (2, 3):
        raise MalformedImage(path, f"qcow2 version {version} is unknown")
    if not 9 <= cluster_bits <= 21:
        raise MalformedImage(path, f"qcow2 cluster_bits {cluster_bits} is out of range")
    cluster_size = 1 << cluster_bits
    incompatible = 0
    header_length = 72
    if version == 3:
        if len(head) < 104:
            raise MalformedImage(path, "qcow2 v3 header is truncated")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
        if header_length < 104 or header_length > cluster_size:
            raise MalformedImage(path, f"qcow2 header length {header_length} is invalid")
    # Header extensions live in the first cluster, after the header.
    first = head
    if len(first) < min(cluster_size, size):
        f.seek(0)
        first = f.read(min(cluster_size, MAX_QCOW2_CLUSTER))
    data_file: str | None = "" if incompatible & QCOW2_EXTERNAL_DATA else None
    encrypted = crypt_method != 0
    end = backing_offset if 0 < backing_offset < len(first) else len(first)
    offset = header_length
    while offset + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", first, offset)
        if ext_type == QCOW2_EXT_END:
            break
        body = first[offset + 8 : offset + 8 + ext_len]
        if len(body) < ext_len:
            raise MalformedImage(path, f"qcow2 header extension {ext_type:#x} runs past the header")
        if ext_type == QCOW2_EXT_DATA_FILE:
            data_file = body.decode("utf-8", "replace")
        elif ext_type == QCOW2_EXT_ENCRYPTION:
            encrypted = True
        offset += 8 + (ext_len + 7) // 8 * 8
    backing = None
    if backing_offset:
        if backing_size > 1023:
            raise MalformedImage(path, f"qcow2 backing file name of {backing_size} bytes")
        backing = _read_string(path, f, backing_offset, backing_size)
    return ImageInfo(
        path=path,
        format=fmt,
        file_size=size,
        virtual_size=virtual_size,
        version=version,
        cluster_size=cluster_size,
        backing_file=backing,
        data_file=data_file,
        encrypted=encrypted,
        unknown_features=incompatible & ~QCOW2_KNOWN_INCOMPATIBLE,
        corrupt=bool(incompatible & QCOW2_CORRUPT),
    )


def _read_string(path: str, f: BinaryIO, offset: int, length: int) -> str:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise MalformedImage(path, "a header string runs past the end of the file")
    return data.decode("utf-8", "replace")


QED_F_BACKING_FILE = 0x01


def _parse_qed(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    if len(head) < 64:
        raise MalformedImage(path, "qed header is truncated")
    (features,) = struct.unpack_from("<Q", head, 16)
    virtual_size, backing_offset, backing_size = struct.unpack_from("<QII", head, 48)
    backing = None
    if features & QED_F_BACKING_FILE:
        backing = _read_string(path, f, backing_offset, min(backing_size, 1023)) or "?"
    return ImageInfo(
        path=path,
        format=ImageFormat.QED,
        file_size=size,
        virtual_size=virtual_size,
        backing_file=backing,
    )


VMDK_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+\d+\s+(\w+)\s+"([^"]*)"', re.MULTILINE)
VMDK_CREATE_TYPE = re.compile(r'^createType\s*=\s*"([^"]*)"', re.MULTILINE)
VMDK_SINGLE_FILE_TYPES = ("monolithicSparse", "streamOptimized")


def _parse_vmdk(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    if head.startswith(VMDK_DESCRIPTOR):
        # A descriptor-only vmdk is nothing but pointers to other files.
        text = head.decode("utf-8", "replace")
        files = tuple(m.group(3) for m in VMDK_EXTENT.finditer(text)) or ("?",)
        return ImageInfo(
            path=path,
            format=ImageFormat.VMDK,
            file_size=size,
            virtual_size=None,
            external_extents=files,
        )
    if head.startswith(VMDK_COWD_MAGIC):
        return ImageInfo(
            path=path,
            format=ImageFormat.VMDK,
            file_size=size,
            virtual_size=None,
            external_extents=("(ESX COWD sparse extent with a parent)",),
        )
    if len(head) < 44:
        raise MalformedImage(path, "vmdk header is truncated")
    version, _flags, capacity, _grain, desc_offset, desc_size = struct.unpack_from(
        "<IIQQQQ", head, 4
    )
    external: list[str] = []
    if desc_offset and desc_size:
        if desc_size > 2048:  # sectors; qemu caps descriptors at 1 MiB as well
            raise MalformedImage(path, f"vmdk descriptor of {desc_size} sectors")
        f.seek(desc_offset * 512)
        text = f.read(desc_size * 512).split(b"\0", 1)[0].decode("utf-8", "replace")
        create = VMDK_CREATE_TYPE.search(text)
        if create is None or create.group(1) not in VMDK_SINGLE_FILE_TYPES:
            kind = create.group(1) if create else "missing"
            external.append(f"(createType {kind})")
        own = os.path.basename(path)
        for m in VMDK_EXTENT.finditer(text):
            kind, name = m.group(2), m.group(3)
            # The one extent of a single-file vmdk is this file itself.
            if kind != "SPARSE" or os.path.basename(name) != name or name == "":
                external.append(name or "?")
            elif name != own:
                # qemu opens extents relative to the image's directory.
                external.append(name)
    return ImageInfo(
        path=path,
        format=ImageFormat.VMDK,
        file_size=size,
        virtual_size=capacity * 512,
        version=version,
        external_extents=tuple(external),
    )


VHD_DIFFERENCING = 4


def _parse_vpc(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    footer = head[:512] if head.startswith(VHD_COOKIE) else tail[-512:]
    if len(footer) < 64:
        raise MalformedImage(path, "vhd footer is truncated")
    (current_size,) = struct.unpack_from(">Q", footer, 48)
    (disk_type,) = struct.unpack_from(">I", footer, 60)
    parent = "(differencing disk parent)" if disk_type == VHD_DIFFERENCING else None
    return ImageInfo(
        path=path,
        format=ImageFormat.VPC,
        file_size=size,
        virtual_size=current_size,
        backing_file=parent,
    )


def _parse_vdi(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    # VDI 1.1 header: the disk size is at 0x170 (little endian).
    virtual = struct.unpack_from("<Q", head, 0x170)[0] if len(head) >= 0x178 else None
    return ImageInfo(path=path, format=ImageFormat.VDI, file_size=size, virtual_size=virtual)


def _parse_luks(path: str, f: BinaryIO, head: bytes, tail: bytes, size: int) -> ImageInfo:
    return ImageInfo(
        path=path, format=ImageFormat.LUKS, file_size=size, virtual_size=None, encrypted=True
    )


_PARSERS = {
    ImageFormat.QCOW2: _parse_qcow,
    ImageFormat.QCOW: _parse_qcow,
    ImageFormat.QED: _parse_qed,
    ImageFormat.VMDK: _parse_vmdk,
    ImageFormat.VPC: _parse_vpc,
    ImageFormat.VDI: _parse_vdi,
    ImageFormat.LUKS: _parse_luks,
}


# --- judgement ------------------------------------------------------------------


def check_safe(info: ImageInfo) -> None:
    """Raise the first reason the image must not be used, if any."""
    if info.backing_file is not None:
        raise BackingFileRejected(
            info.path,
            f"{info.format} header names a backing file ({info.backing_file!r});"
            " images must be self-contained",
        )
    if info.data_file is not None:
        raise DataFileRejected(
            info.path,
            "qcow2 keeps its data in an external data file"
            + (f" ({info.data_file!r})" if info.data_file else "")
            + "; images must be self-contained",
        )
    if info.external_extents:
        raise DataFileRejected(
            info.path,
            f"vmdk refers to extents outside the file ({', '.join(info.external_extents)})",
        )
    if info.encrypted:
        raise EncryptedImageRejected(info.path, f"{info.format} image is encrypted")
    if info.corrupt:
        raise MalformedImage(info.path, "qcow2 header has the corrupt bit set")
    if info.unknown_features:
        raise UnsupportedFeature(
            info.path, f"qcow2 has unknown incompatible features {info.unknown_features:#x}"
        )


def verify_image(
    path: str,
    declared: str,
    *,
    allowed: frozenset[ImageFormat] = DEFAULT_ALLOWED,
) -> ImageInfo:
    """Inspect, then insist on: the declared format, an allowed format, safety."""
    info = inspect_image(path)
    if info.format != declared:
        raise FormatMismatch(path, declared, info.format)
    if info.format not in allowed:
        names = ", ".join(sorted(allowed))
        raise FormatNotAllowed(path, f"format {info.format} is not accepted (only {names})")
    check_safe(info)
    return info


def sector_aligned(size: int) -> int:
    """`size` rounded up to whole 512-byte sectors, as qemu sizes raw files."""
    return -(-size // 512) * 512


# --- qemu-img cross-check ---------------------------------------------------------


@dataclass(frozen=True)
class QemuImgInfo:
    format: str
    virtual_size: int
    actual_size: int | None
    backing_file: str | None
    data_file: str | None
    encrypted: bool


def qemu_img_info(runner: Runner, path: str, fmt: ImageFormat | str) -> QemuImgInfo:
    """`qemu-img info -f FMT --output=json PATH` (never without -f), limited."""
    argv = [*QEMU_IMG_LIMITS, "qemu-img", "info", "-f", str(fmt), "--output=json", path]
    try:
        out = runner(argv, timeout=60).stdout
    except CommandError as e:
        raise MalformedImage(path, f"qemu-img cannot read it as {fmt}: {e}") from e
    try:
        data: dict[str, Any] = json.loads(out)
        specific = (data.get("format-specific") or {}).get("data") or {}
        return QemuImgInfo(
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data["actual-size"]) if "actual-size" in data else None,
            backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
            data_file=specific.get("data-file"),
            encrypted=bool(data.get("encrypted", False)),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedImage(path, f"qemu-img info gave unusable output: {e}") from e


def cross_check(runner: Runner, info: ImageInfo) -> QemuImgInfo:
    """qemu-img must agree with the header inspection; returns its view.

    Only for formats qemu opens by their own driver (an ISO is opened raw).
    """
    driver = ImageFormat.RAW if info.format == ImageFormat.ISO else info.format
    qemu = qemu_img_info(runner, info.path, driver)
    if qemu.backing_file:
        raise BackingFileRejected(
            info.path, f"qemu-img sees a backing file ({qemu.backing_file!r})"
        )
    if qemu.data_file:
        raise DataFileRejected(
            info.path, f"qemu-img sees an external data file ({qemu.data_file!r})"
        )
    if qemu.encrypted:
        raise EncryptedImageRejected(info.path, "qemu-img sees encryption")
    expected = info.virtual_size
    if expected is not None and driver == ImageFormat.RAW:
        expected = sector_aligned(expected)  # qemu sees raw files in whole sectors
    if expected is not None and qemu.virtual_size != expected:
        raise MalformedImage(
            info.path,
            f"virtual size {expected} from the header but {qemu.virtual_size} from qemu-img",
        )
    return qemu
