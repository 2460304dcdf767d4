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
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.boot_baselines import LEASE, libvirt_boot, raw_boot, raw_network, wait_file
from bench.cluster import install_crds
from nubes.api.compute import Instance
from nubes.api.image import Image
from nubes.api.network import Network, Port
from nubes.runtime.kube import NAMESPACES, KindPath, Kube, path_of
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, free_port
from tests.nodes import Fabric, sh

# Per boot, seconds after the create: the intent resolved (scheduled, ports
# made), the ports Ready (bound, in DHCP), QEMU started (it opened the
# console; paused while the ports are wired), the guest's CPUs running.
STEPS = ("intent", "ports_ready", "guest_started", "guest_running")
FLAVORS = KindPath("compute.nubes.io", "v1alpha1", "flavors", False)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


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
    try:
        await setup(kube, ns, zone, image, flavor)
        latencies, steps = await ours(kube, ns, root, zone, flavor, boots)
        with raw_network(zone) as (bridge, tap, netns):
            raw = [
                await asyncio.to_thread(raw_boot, root, image, tap, netns) for _ in range(boots + 1)
            ][1:]
            # QEMU's user must read the base: the build cache is root's.
            base = root / "base.qcow2"
            shutil.copyfile(image, base)
            base.chmod(0o644)
            plain = [
                await asyncio.to_thread(libvirt_boot, root, base, bridge, netns, zone)
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
