"""Boot latency: from creating an Instance to the guest's DHCP lease, next to
a raw qemu-system-x86_64 boot of the same image with the same devices (virtio
disk overlay, config drive, virtio NIC on a bridge with a DHCP server, serial
to a file, TCG) in the same run, and the domain Nubes would define for it
created straight through libvirt on that same network. Overhead = ours - raw,
split into libvirt's (libvirt - raw) and the control plane's (ours - libvirt).

Runs a controller and one node agent on a simulated node against the local
control plane; prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from bench.cluster import install_crds
from nubes.api.compute import Instance
from nubes.api.image import Image
from nubes.api.network import Network, Port
from nubes.drivers.compute.configdrive import ConfigDriveSpec, ensure_config_drive
from nubes.drivers.compute.domain import DomainSpec, FileDisk, Nic, Owner, domain_xml
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import NAMESPACES, KindPath, Kube, path_of
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, free_port
from tests.nodes import Fabric, sh

LEASE = "nubes-guest: lease eth0"
# Per boot, seconds after the create: the intent resolved (scheduled, ports
# made), the ports Ready (bound, in DHCP), QEMU started (it opened the
# console; paused while the ports are wired), the guest's CPUs running.
STEPS = ("intent", "ports_ready", "guest_started", "guest_running")
FLAVORS = KindPath("compute.nubes.io", "v1alpha1", "flavors", False)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


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


# --- ours -------------------------------------------------------------------------


async def ours(
    kube: Kube, ns: str, root: Path, zone: str, flavor: str, boots: int
) -> tuple[list[float], list[dict[str, float]]]:
    """Latencies to the lease, and per boot when each of STEPS was done."""
    latencies, steps = [], []
    for i in range(boots + 1):  # the first boot fills the node's image cache: not counted
        name = f"vm{i}"
        started = time.monotonic()
        created = await kube.create_raw(
            path_of(Instance),
            {
                "apiVersion": Instance.crd.api_version,
                "kind": "Instance",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "flavor": flavor,
                    "image": {"name": "guest"},
                    "availabilityZone": zone,
                    "networks": [{"network": {"name": "net"}}],
                },
            },
            ns,
        )
        log = root / "agent" / "instances" / created["metadata"]["uid"] / "console.log"
        watcher = asyncio.create_task(milestones(kube, ns, name, log, started))
        leased = await wait_file(log, LEASE, 180)
        seen = await watcher
        if i:
            latencies.append(leased - started)
            steps.append(seen)
        await kube.delete_raw(path_of(Instance), name, ns)
        while await kube.get(Instance, name, ns) is not None:
            await asyncio.sleep(0.2)
    return latencies, steps


async def milestones(
    kube: Kube, ns: str, name: str, console: Path, started: float
) -> dict[str, float]:
    seen: dict[str, float] = {}
    deadline = started + 180
    while len(seen) < len(STEPS) and time.monotonic() < deadline:
        now = time.monotonic() - started
        if "intent" not in seen or "guest_running" not in seen:
            inst = await kube.get(Instance, name, ns)
            if inst is not None and inst.status.intent is not None:
                seen.setdefault("intent", now)
            if inst is not None and inst.status.power_state == "Running":
                seen["guest_running"] = now
        if "intent" in seen and "ports_ready" not in seen:
            mine = [p for p in await kube.list(Port, ns) if p.name.startswith(f"{name}-")]
            if mine and all(p.status.is_true("Ready") for p in mine):
                seen["ports_ready"] = now
        if "guest_started" not in seen and console.exists():
            seen["guest_started"] = now
        await asyncio.sleep(0.02)
    return seen


# --- raw QEMU ------------------------------------------------------------------------


def raw_network(prefix: str) -> tuple[str, str, list[str]]:
    """A bridge with a tap for QEMU and a DHCP server in a namespace of its own."""
    bridge, tap, netns = f"{prefix}br"[:15], f"{prefix}tp"[:15], f"{prefix}-rawdhcp"
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "link", "set", bridge, "up")
    sh("ip", "tuntap", "add", "dev", tap, "mode", "tap")
    sh("ip", "link", "set", tap, "master", bridge, "up")
    sh("ip", "netns", "add", netns)
    sh(
        "ip",
        "link",
        "add",
        f"{prefix}vh"[:15],
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns,
    )
    sh("ip", "link", "set", f"{prefix}vh"[:15], "master", bridge, "up")
    sh("ip", "-n", netns, "addr", "add", "10.99.0.2/24", "dev", "eth0")
    sh("ip", "-n", netns, "link", "set", "eth0", "up")
    return bridge, tap, [netns]


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


# --- the run -------------------------------------------------------------------------


async def setup(kube: Kube, ns: str, zone: str, image: Path, flavor: str) -> None:
    await kube.create_raw(
        NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    )
    await kube.create_raw(
        FLAVORS,
        {
            "apiVersion": "compute.nubes.io/v1alpha1",
            "kind": "Flavor",
            "metadata": {"name": flavor},
            "spec": {"vcpus": 1, "ramMib": 256, "diskGib": 1},
        },
    )
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    await kube.create_raw(
        path_of(Image),
        {
            "apiVersion": Image.crd.api_version,
            "kind": "Image",
            "metadata": {"name": "guest", "namespace": ns},
            "spec": {"source": {"url": image.as_uri()}, "diskFormat": "qcow2", "sha256": sha},
        },
        ns,
    )
    await kube.create_raw(
        path_of(Network),
        {
            "apiVersion": Network.crd.api_version,
            "kind": "Network",
            "metadata": {"name": "net", "namespace": ns},
            "spec": {"type": "vxlan", "availabilityZoneHints": [zone]},
        },
        ns,
    )
    await kube.create_raw(
        KindPath("network.nubes.io", "v1alpha1", "subnets", True),
        {
            "apiVersion": "network.nubes.io/v1alpha1",
            "kind": "Subnet",
            "metadata": {"name": "net-v4", "namespace": ns},
            "spec": {"network": {"name": "net"}, "cidr": "10.98.0.0/24"},
        },
        ns,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        img = await kube.get(Image, "guest", ns)
        net = await kube.get(Network, "net", ns)
        if img and img.status.is_true("Ready") and net and net.status.is_true("Ready"):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("image or network not ready")


async def run(boots: int) -> dict[str, Any]:
    image = build_guest_image()
    root = Path(tempfile.mkdtemp(prefix="nubes-bench-boot-", dir="/var/tmp"))
    root.chmod(0o755)
    fabric = Fabric.start(root / "fabric", ["k1"])
    node = fabric.nodes[0]
    zone = fabric.prefix
    flavor = f"bench-{uuid.uuid4().hex[:6]}"
    logs = root / "logs"
    controller = Process(
        "controller",
        [
            "controller",
            "--image-store",
            str(root / "images"),
            "--image-import-dir",
            str(image.parent),
        ],
        logs / "controller.log",
        free_port(),
    ).start()
    agent = Process(
        "agent",
        [*fabric.agent_argv(node, root / "agent"), "--image-store", str(root / "images")],
        logs / "agent.log",
        free_port(),
    ).start()
    kube = await Kube.connect(field_manager="bench")
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    netns: list[str] = []
    bridge = ""
    try:
        await setup(kube, ns, zone, image, flavor)
        latencies, steps = await ours(kube, ns, root, zone, flavor, boots)
        bridge, tap, netns = raw_network(zone)
        raw = [
            await asyncio.to_thread(raw_boot, root, image, tap, netns[0]) for _ in range(boots + 1)
        ][1:]
        # QEMU's user must read the base: the build cache is root's.
        base = root / "base.qcow2"
        shutil.copyfile(image, base)
        base.chmod(0o644)
        plain = [
            await asyncio.to_thread(libvirt_boot, root, base, bridge, netns[0], zone)
            for _ in range(boots + 1)
        ][1:]
    finally:
        await kube.delete_raw(NAMESPACES, ns)
        await kube.delete_raw(FLAVORS, flavor)
        # The agent removes domains and DHCP servers before the namespace goes.
        deadline = time.monotonic() + 180
        while await kube.get_raw(NAMESPACES, ns) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await kube.close()
        agent.stop()
        controller.stop()
        for name in netns:
            sh("ip", "netns", "delete", name, check=False)
        if bridge:
            sh("ip", "link", "delete", f"{zone}tp"[:15], check=False)
            sh("ip", "link", "delete", f"{zone}vh"[:15], check=False)
            sh("ip", "link", "delete", bridge, check=False)
        fabric.stop()
        if sys.exc_info()[0] is not None:  # failing: keep the logs for a look
            shutil.copytree(
                root / "logs", Path(tempfile.gettempdir()) / root.name, dirs_exist_ok=True
            )
        sh("rm", "-rf", str(root))
    p50, raw_p50 = statistics.median(latencies), statistics.median(raw)
    libvirt_p50 = statistics.median(plain)
    return {
        "boots": len(latencies),
        "p50_s": round(p50, 2),
        "p95_s": round(percentile(latencies, 95), 2),
        "raw_p50_s": round(raw_p50, 2),
        "raw_p95_s": round(percentile(raw, 95), 2),
        "overhead_p50_s": round(p50 - raw_p50, 2),
        # The same domain created through libvirt alone: the overhead splits
        # into libvirt's (its start, the guest it runs) and the control plane's.
        "libvirt_p50_s": round(libvirt_p50, 2),
        "libvirt_p95_s": round(percentile(plain, 95), 2),
        "libvirt_overhead_p50_s": round(libvirt_p50 - raw_p50, 2),
        "control_plane_overhead_p50_s": round(p50 - libvirt_p50, 2),
        # Medians, seconds after the create: where the overhead goes.
        "steps_p50_s": {
            step: round(statistics.median(s[step] for s in steps if step in s), 2)
            for step in STEPS
            if any(step in s for s in steps)
        },
        "guest_running_to_lease_p50_s": round(
            statistics.median(
                lat - s["guest_running"]
                for lat, s in zip(latencies, steps, strict=True)
                if "guest_running" in s
            ),
            2,
        ),
        "accel": "tcg",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boots", type=int, default=10)
    args = parser.parse_args()
    install_crds()
    print(json.dumps(asyncio.run(run(args.boots))))


if __name__ == "__main__":
    main()
