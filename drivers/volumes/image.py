"""Copy an image file into a volume with qemu-img, after inspecting it.

Always with an explicit `-f`: letting qemu-img guess the format lets a raw
image that merely looks like qcow2 pull in host files. Images whose metadata
points outside themselves (qcow2 backing file or external data file, vmdk
extents in other files) are refused before anything reads them as guest data
(the CVE-2024-32498 class). Inspection runs under prlimit, as Cinder does, so
a crafted header cannot make qemu-img eat the node's memory or CPU.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import structlog

from nubes.drivers.runner import CommandError, Runner
from nubes.drivers.volumes.base import ImageRejected

log = structlog.get_logger()

INFO_LIMITS = ["prlimit", "--as=1073741824", "--cpu=30", "--"]


_FORMAT = re.compile(r"^[a-z0-9]{2,16}$")


@dataclass(frozen=True)
class ImageFacts:
    format: str
    virtual_size: int
    actual_size: int | None


def check_format(image_format: str) -> str:
    if image_format == "iso" or not _FORMAT.fullmatch(image_format):
        raise ImageRejected(f"{image_format!r} is not a disk image format qemu-img can convert")
    return image_format


def inspect_image(runner: Runner, image_path: str, image_format: str) -> ImageFacts:
    """Facts about an image, or ImageRejected when it is unsafe to convert."""
    check_format(image_format)
    argv = [
        *INFO_LIMITS,
        "qemu-img",
        "info",
        "-f",
        image_format,
        "--output",
        "json",
        image_path,
    ]
    try:
        out = runner(argv, timeout=60).stdout
    except CommandError as e:
        raise ImageRejected(f"{image_path} is not a readable {image_format} image: {e}") from e
    try:
        info: dict[str, Any] = json.loads(out)
    except ValueError as e:
        raise ImageRejected(f"qemu-img info gave no JSON for {image_path}") from e
    _refuse_external_references(image_path, info)
    return ImageFacts(
        format=image_format,
        virtual_size=int(info["virtual-size"]),
        actual_size=int(info["actual-size"]) if "actual-size" in info else None,
    )


def _refuse_external_references(image_path: str, info: dict[str, Any]) -> None:
    if "backing-filename" in info or "full-backing-filename" in info:
        raise ImageRejected(
            f"{image_path} has a backing file ({info.get('backing-filename')});"
            " images must be self-contained"
        )
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise ImageRejected(
            f"{image_path} keeps its data in an external file ({data['data-file']});"
            " images must be self-contained"
        )
    own = os.path.realpath(image_path)
    for extent in data.get("extents") or []:
        name = extent.get("filename")
        if name and os.path.realpath(name) != own:
            raise ImageRejected(f"{image_path} has an extent in another file ({name})")


def convert_to_raw(
    runner: Runner,
    image_path: str,
    image_format: str,
    target: str,
    *,
    target_is_zero: bool,
    timeout: float = 3600,
) -> None:
    """Write the image's guest data into an existing target file or device.

    `-n` keeps the target as it is (a volume must not be re-created at the
    image's size); `--target-is-zero` lets qemu-img skip zero areas when the
    caller knows the target is blank, which keeps file volumes thin.
    """
    argv = ["qemu-img", "convert", "-f", image_format, "-O", "raw", "-n"]
    if target_is_zero:
        argv.append("--target-is-zero")
    argv += [image_path, target]
    runner(argv, timeout=timeout)
    log.info("image copied", image=image_path, format=image_format, target=target)
