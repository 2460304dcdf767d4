"""Facts about the node: CPUs, memory, disk, and whether KVM really works."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import structlog

from nubes.drivers.runner import Runner

log = structlog.get_logger()

VirtType = Literal["kvm", "qemu"]


def cpu_count() -> int:
    return os.cpu_count() or 1


def memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def disk_gib(path: str) -> int:
    os.makedirs(path, exist_ok=True)
    return shutil.disk_usage(path).total // 2**30


def qemu_version(runner: Runner) -> str:
    out = runner(["qemu-system-x86_64", "--version"]).stdout
    # "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"
    words = out.split()
    return words[3] if len(words) > 3 else out.strip()


def host_kernel() -> str | None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    return kernels[-1] if kernels else None


def detect_virt_type(runner: Runner, cache_dir: str, *, timeout: float = 8) -> VirtType:
    """kvm only if a Linux kernel actually boots under KVM here.

    /dev/kvm can exist and still be unusable (nested or paravirtualised hosts
    where vCPUs hang or QEMU aborts), so the probe boots a kernel with no root
    filesystem under KVM and expects it to reach its panic and exit. The
    answer is cached per QEMU version and kernel.
    """
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    kernel = host_kernel()
    if kernel is None:
        return "qemu"
    key = f"{qemu_version(runner)}|{kernel}|{os.stat(kernel).st_mtime_ns}"
    cache = Path(cache_dir) / "virt-type.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return "kvm" if cached["virt_type"] == "kvm" else "qemu"
    except (OSError, ValueError, KeyError):
        pass
    argv = [
        "timeout",
        "--kill-after=2",
        str(timeout),
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-M",
        "pc",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        kernel,
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3",
    ]
    result = runner(argv, check=False, timeout=timeout + 5)
    booted = result.returncode == 0 and "Kernel panic" in result.stdout
    virt: VirtType = "kvm" if booted else "qemu"
    log.info("virtualisation probe", virt_type=virt, rc=result.returncode)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "virt_type": virt}))
    return virt
