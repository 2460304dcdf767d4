"""The baselines of `make bench-boot`, without the control plane: the same
guest booted by raw qemu-system-x86_64, and the domain Nubes would define
for it created straight through libvirt, both on a bridge of their own with
a DHCP server in a namespace."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

from nubes.drivers.compute.configdrive import ConfigDriveSpec, ensure_config_drive
from nubes.drivers.compute.domain import DomainSpec, FileDisk, Nic, Owner, domain_xml
from nubes.drivers.runner import SubprocessRunner
from tests.nodes import sh

LEASE = "nubes-guest: lease eth0"


async def wait_file(path: Path, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_text(errors="replace"):
                return time.monotonic()
        except FileNotFoundError:
            pass
        await asyncio.sleep(0.02)
    seen = path.read_text(errors="replace")[-2000:] if path.exists() else "(no file)"
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s; it ends with:\n{seen}")


@contextmanager
def raw_network(prefix: str) -> Iterator[tuple[str, str, str]]:
    """A bridge with a tap for QEMU and a DHCP server in a namespace of its
    own: (bridge, tap, namespace), all removed afterwards, also when made
    only in part."""
    bridge, tap, veth, netns = (
        f"{prefix}br"[:15],
        f"{prefix}tp"[:15],
        f"{prefix}vh"[:15],
        f"{prefix}-rawdhcp",
    )
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "up")
        sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        sh("ip", "link", "set", tap, "master", bridge, "up")
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", veth, "master", bridge, "up")
        sh("ip", "-n", netns, "addr", "add", "10.99.0.2/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        yield bridge, tap, netns
    finally:
        sh("ip", "netns", "delete", netns, check=False)
        for link in (tap, veth, bridge):
            sh("ip", "link", "delete", link, check=False)


@contextmanager
def dhcp_server(netns: str, mac: str) -> Iterator[None]:
    """dnsmasq on the raw network, with one static lease for `mac`."""
    dnsmasq = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            netns,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--port=0",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--interface=eth0",
            "--user=root",
            "--dhcp-range=10.99.0.10,10.99.0.50,255.255.255.0",
            f"--dhcp-host={mac},10.99.0.10",
            "--pid-file=",
            "--leasefile-ro",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        dnsmasq.kill()
        dnsmasq.wait()


def guest_disks(workdir: Path, base: Path, tag: str) -> tuple[Path, Path]:
    """A fresh qcow2 overlay on `base` and a config drive, readable by QEMU's user."""
    runner = SubprocessRunner()
    overlay = workdir / f"{tag}.qcow2"
    overlay.unlink(missing_ok=True)
    runner(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)]
    )
    drive = Path(
        ensure_config_drive(
            runner,
            ConfigDriveSpec(uuid=str(uuid.uuid4()), name=tag, hostname=tag),
            str(workdir / f"{tag}.iso"),
        ).path
    )
    for path in (overlay, drive):
        path.chmod(0o644)
    return overlay, drive


def raw_boot(workdir: Path, image: Path, tap: str, netns: str) -> float:
    overlay, drive = guest_disks(workdir, image, "raw")
    log = workdir / "raw-console.log"
    log.unlink(missing_ok=True)
    mac = "52:54:00:12:34:56"
    with dhcp_server(netns, mac):
        started = time.monotonic()
        qemu = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-machine",
                "pc",
                "-m",
                "256",
                "-smp",
                "1",
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                f"file:{log}",
                "-drive",
                f"if=virtio,file={overlay},format=qcow2",
                "-drive",
                f"if=virtio,file={drive},format=raw,readonly=on",
                "-netdev",
                f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=n0,mac={mac}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            leased = asyncio.run(wait_file(log, LEASE, 120))
        finally:
            qemu.kill()
            qemu.wait()
    return leased - started


def libvirt_boot(workdir: Path, base: Path, bridge: str, netns: str, zone: str) -> float:
    """The domain XML the node agent would define for this guest (our
    builder), created straight through libvirt on the raw network: what
    libvirt itself adds over raw QEMU, without the control plane."""
    overlay, drive = guest_disks(workdir, base, "libvirt")
    log = workdir / "libvirt-console.log"
    log.unlink(missing_ok=True)
    mac = "52:54:00:12:34:57"
    spec = DomainSpec(
        name=f"{zone}-libvirt-baseline",
        uuid=str(uuid.uuid4()),
        owner=Owner(uid=str(uuid.uuid4()), namespace="bench", name="libvirt-baseline"),
        vcpus=1,
        memory_mib=256,
        virt_type="qemu",
        root_disk=FileDisk(path=str(overlay), target="vda"),
        console_log=str(log),
        config_drive=str(drive),
        nics=(Nic(bridge=bridge, tap=f"{zone}lv"[:15], mac=mac),),
    )
    conn = libvirt.open("qemu:///system")
    try:
        with dhcp_server(netns, mac):
            started = time.monotonic()
            domain = conn.createXML(domain_xml(spec), 0)
            try:
                leased = asyncio.run(wait_file(log, LEASE, 120))
            finally:
                domain.destroy()
    finally:
        conn.close()
    return leased - started
