"""Images, flavors and instances end to end: the controller imports the image
(checksum, inspection), schedules and makes ports; the node agent boots the
test guest under libvirt/QEMU (TCG) from its disk's bootloader, plugged into
OVS, and the guest gets its port's address by DHCP (seen on its console)."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Hypervisor, Instance, InstanceAction
from nubes.api.image import Image
from nubes.drivers.compute.libvirt import DomainState
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    MARKER_SCRIPT,
    condition,
    console,
    domain_state,
    flavor,
    image,
    network,
    node_name,
    said,
    start_agent,
    subnet,
    virsh,
    wait_console,
)
from tests.nodes import Fabric, sh


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["c1", "c2"])
    ZONE["name"] = fab.prefix
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[list[Process]]:
    # No grace for unused cached images: the cache must be empty once the
    # instances are gone.
    procs = [
        start_agent(
            fabric,
            node,
            tmp_path_factory,
            state_root=workdir,
            image_store=image_store,
            extra_args=("--image-cache-grace", "0"),
        )
        for node in fabric.nodes
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        for node in fabric.nodes:
            kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")
    for proc in procs:
        proc.assert_no_crash()


@pytest.fixture(autouse=True)
async def instances_removed(
    kube: Kube, namespace: str, agent: list[Process], fabric: Fabric, workdir: Path
) -> AsyncIterator[None]:
    """Delete a test's instances while the agents still run (their finalizers
    need them), and make sure nothing of them is left on the node."""
    yield
    kubectl("delete", "instances", "--all", "-n", namespace, "--wait=false", check=False)
    await instances_gone(kube, namespace, agent, timeout=180)
    leftover = [n for n in virsh("list", "--all", "--name").split() if n.startswith("nubes-")]
    assert not leftover, f"domains left behind: {leftover}"
    for node in fabric.nodes:
        instances = workdir / f"agent-{node.name}" / "instances"
        cached = [p.name for p in (instances / "_base").glob("*") if not p.name.startswith(".")]
        assert not cached, f"unused cached images on {node.name}: {cached}"
        left = [p.name for p in instances.glob("*") if p.name != "_base"]
        assert not left, f"instance directories left on {node.name}: {left}"


@pytest.fixture(scope="module")
def guest_image() -> tuple[Path, str]:
    path = build_guest_image()
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


ZONE: dict[str, str] = {}


def instance(ns: str, name: str, **spec: Any) -> None:
    """An instance confined to this module's nodes (their availability zone)."""
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "Instance",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"availabilityZone": ZONE["name"], **spec},
        }
    )


@pytest.fixture
def flavor_name() -> Iterator[str]:
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    flavor(name)
    yield name
    kubectl("delete", "flavor", name, "--ignore-not-found", "--wait=false")


async def test_boot_power_states_and_cleanup(
    kube: Kube,
    controller: Process,
    agent: list[Process],
    fabric: Fabric,
    namespace: str,
    guest_image: tuple[Path, str],
    flavor_name: str,
    workdir: Path,
    image_store: Path,
) -> None:
    ns = namespace
    path, sha = guest_image
    image(ns, "guest", path, sha)
    img = await condition(kube, Image, "guest", ns, timeout=120)
    assert img.status.format == "qcow2" and img.status.sha256 == sha
    assert img.status.virtual_size_bytes and img.status.virtual_size_bytes > 0
    network(ns, "net", fabric, type="vxlan")
    subnet(ns, "net-v4", "net", "10.30.0.0/24")
    instance(
        ns,
        "vm1",
        flavor=flavor_name,
        image={"name": "guest"},
        networks=[{"network": {"name": "net"}}],
        userData="#!/bin/sh\necho hello-from-user-data\n",
    )
    vm = await condition(kube, Instance, "vm1", ns, timeout=180)
    assert vm.status.node in [node_name(fabric, n) for n in fabric.nodes]
    assert vm.status.power_state == "Running"
    events = kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=vm1,reason=Scheduled"
    ).stdout
    assert f"scheduled to {vm.status.node}" in events, events
    ip = vm.status.addresses[0].ip_addresses[0]
    log = await wait_console(kube, "vm1", ns, f"lease eth0 ip={ip}/24")
    assert "router=10.30.0.1 mtu=1450" in log
    assert "hello-from-user-data" in log
    assert domain_state(vm.status.domain) == DomainState.RUNNING
    hv = await kube.get(Hypervisor, vm.status.node)
    assert hv is not None and hv.status.vcpus_used == 1 and hv.status.ram_mib_used == 256

    for desired, observed in (
        ("Stopped", DomainState.SHUTOFF),
        ("Paused", DomainState.PAUSED),
        ("Running", DomainState.RUNNING),
        ("Suspended", DomainState.SAVED),
        ("Running", DomainState.RUNNING),
    ):
        kubectl(
            "patch",
            "instance",
            "vm1",
            "-n",
            ns,
            "--type=merge",
            "-p",
            f'{{"spec": {{"powerState": "{desired}"}}}}',
        )

        async def settled(want: str = desired) -> bool:
            got = await kube.get(Instance, "vm1", ns)
            return bool(got and got.status.power_state == want and got.status.is_true("Ready"))

        await eventually(settled, timeout=120, what=f"power state {desired}")
        assert domain_state(vm.status.domain) == observed, desired

    # A second instance from the same image on the same node (the other one
    # disabled) reuses the node's cached base.
    other = next(
        node_name(fabric, n) for n in fabric.nodes if node_name(fabric, n) != vm.status.node
    )
    kubectl("patch", "hypervisor", other, "--type=merge", "-p", '{"spec": {"disabled": true}}')
    try:
        bases = _bases(workdir)
        instance(ns, "vm2", flavor=flavor_name, image={"name": "guest"}, configDrive=False)
        vm2 = await condition(kube, Instance, "vm2", ns, timeout=180)
        assert vm2.status.node == vm.status.node
        assert _bases(workdir) == bases and len(bases) == 1
    finally:
        kubectl("patch", "hypervisor", other, "--type=merge", "-p", '{"spec": {"disabled": false}}')

    kubectl("delete", "instances", "--all", "-n", ns, "--wait=false")

    async def gone() -> bool:
        return not await kube.list(Instance, ns)

    await eventually(gone, timeout=120, what="instances deleted")
    assert domain_state(vm.status.domain) == DomainState.ABSENT
    for instances_dir in workdir.glob("agent-*/instances"):
        assert [p.name for p in instances_dir.iterdir() if not p.name.startswith("_")] == []
    taps = sh("ip", "-o", "link", "show").stdout
    assert f"tap{vm.uid.replace('-', '')[:7]}" not in taps
    assert f"qbr{vm.uid.replace('-', '')[:7]}" not in taps
    for node in fabric.nodes:
        assert "qvo" not in node.vsctl("list-ports", "br-int")


def _bases(workdir: Path) -> list[str]:
    return sorted(
        p.name
        for p in workdir.glob("agent-*/instances/_base/*")
        if p.is_file() and not p.name.endswith(".json")
    )


async def test_bad_input_leaves_nothing_behind(
    kube: Kube,
    controller: Process,
    agent: list[Process],
    namespace: str,
    guest_image: tuple[Path, str],
    flavor_name: str,
    tmp_path: Path,
    image_store: Path,
) -> None:
    ns = namespace
    path, _ = guest_image
    image(ns, "wrong-sum", path, "0" * 64)
    stalled = await condition(kube, Image, "wrong-sum", ns, type_="Stalled")
    assert stalled.status.condition("Stalled").reason == "ChecksumMismatch"

    backing = tmp_path / "evil.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/passwd",
            str(backing),
            "64M",
        ],
        check=True,
    )
    image(ns, "evil", backing, None)
    cond = (await condition(kube, Image, "evil", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "BackingFileRejected" and "backing file" in cond.message

    raw = tmp_path / "as-raw.img"
    raw.write_bytes(path.read_bytes())
    image(ns, "liar", raw, None, fmt="raw")
    cond = (await condition(kube, Image, "liar", ns, type_="Stalled")).status.condition("Stalled")
    assert cond.reason == "FormatMismatch"

    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(2 * 2**30)
    image(ns, "big", big, None, fmt="raw")
    await condition(kube, Image, "big", ns, timeout=60)
    instance(ns, "too-big", flavor=flavor_name, image={"name": "big"})
    cond = (await condition(kube, Instance, "too-big", ns, type_="Stalled")).status.condition(
        "Stalled"
    )
    assert cond.reason == "ImageTooLarge" and "2.00 GiB" in cond.message

    instance(ns, "no-flavor", flavor="no-such-flavor", image={"name": "big"})
    cond = (await condition(kube, Instance, "no-flavor", ns, type_="Stalled")).status.condition(
        "Stalled"
    )
    assert cond.reason == "FlavorNotFound"
    instance(ns, "no-image", flavor=flavor_name, image={"name": "nope"})
    cond = (await condition(kube, Instance, "no-image", ns, type_="Stalled")).status.condition(
        "Stalled"
    )
    assert cond.reason == "ImageNotFound"

    # Another project may use the image only once it is shared with it; then
    # the scheduler explains why no node fits.
    other = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", other)
    try:
        huge = f"huge-{uuid.uuid4().hex[:6]}"
        flavor(huge, ramMib=1024 * 1024, diskGib=4)
        apply(
            {
                "apiVersion": COMPUTE,
                "kind": "Instance",
                "metadata": {"name": "elsewhere", "namespace": other},
                "spec": {
                    "flavor": huge,
                    "image": {"name": "big", "namespace": ns},
                    "availabilityZone": ZONE["name"],
                },
            }
        )
        cond = (
            await condition(kube, Instance, "elsewhere", other, type_="Stalled")
        ).status.condition("Stalled")
        assert cond.reason == "ImageNotVisible" and f"{ns}/big" in cond.message
        kubectl(
            "patch",
            "image",
            "big",
            "-n",
            ns,
            "--type=merge",
            "-p",
            f'{{"spec": {{"visibility": "shared", "sharedWith": ["{other}"]}}}}',
        )

        async def no_host() -> Any:
            got = await kube.get(Instance, "elsewhere", other)
            cond = got.status.condition("Stalled") if got else None
            return cond if cond and cond.reason == "NoValidHost" else None

        cond = await eventually(no_host, timeout=60, what="NoValidHost")
        assert (
            cond.message.startswith("0/") and "insufficient RAM (needs 1048576 MiB)" in cond.message
        )
    finally:
        kubectl("delete", "namespace", other, "--wait=false")
        kubectl("delete", "flavor", huge, "--wait=false", check=False)

    # Nothing half-built: no ports, no domains, nothing stored for refused images.
    assert kubectl("get", "ports", "-n", ns, "-o", "name").stdout.strip() == ""
    for name in ("too-big", "no-flavor", "no-image"):
        got = await kube.get(Instance, name, ns)
        assert got is not None and got.status.node is None
        assert got.status.domain is None
    stored = {p.name for p in image_store.iterdir()}
    for name in ("wrong-sum", "evil", "liar"):
        got_img = await kube.get(Image, name, ns)
        assert got_img is not None and got_img.uid not in stored


def action(ns: str, name: str, inst: str, kind: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "InstanceAction",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"instance": inst, "action": kind, **spec},
        }
    )


async def test_instance_actions(
    kube: Kube,
    controller: Process,
    agent: list[Process],
    fabric: Fabric,
    namespace: str,
    guest_image: tuple[Path, str],
    flavor_name: str,
    image_store: Path,
    workdir: Path,
) -> None:
    ns = namespace
    path, sha = guest_image
    image(ns, "guest", path, sha)
    big = f"big-{uuid.uuid4().hex[:6]}"
    flavor(big, vcpus=2, ramMib=320, diskGib=2)
    network(ns, "net", fabric, type="vxlan")
    subnet(ns, "net-v4", "net", "10.31.0.0/24")
    instance(
        ns,
        "vm",
        flavor=flavor_name,
        image={"name": "guest"},
        networks=[{"network": {"name": "net"}}],
        userData=MARKER_SCRIPT,
    )
    await condition(kube, Instance, "vm", ns, timeout=180)
    await wait_console(kube, "vm", ns, "marker-written", line=True)

    async def done(name: str) -> Any:
        return await condition(kube, InstanceAction, name, ns, timeout=180)

    # Counting across boots reads the node's whole console log: the ConfigMap
    # holds only its last 64 KiB, which after a few boots no longer shows
    # every earlier line.
    async def whole_console() -> str:
        vm = await kube.get(Instance, "vm", ns)
        assert vm is not None
        logs = workdir.glob(f"agent-*/instances/{vm.uid}/console.log")
        return "".join(p.read_text(errors="replace") for p in logs)

    async def boots() -> int:
        return (await whole_console()).count("nubes-guest: boot ")

    async def lines(text: str, times: int) -> bool:
        return said(await whole_console(), text) >= times

    try:
        # Each reboot runs the user data again, which finds its marker. The
        # next action waits for that line: a HardReboot issued as soon as the
        # soft-rebooted guest printed its boot line cut that boot short.
        for found, kind in enumerate(("SoftReboot", "HardReboot"), start=1):
            before = await boots()
            action(ns, kind.lower(), "vm", kind)
            await done(kind.lower())
            await eventually(
                lambda b=before: _more(boots, b), timeout=120, what=f"boot after {kind}"
            )
            await eventually(
                lambda n=found: lines("marker-found", n), timeout=120, what=f"marker after {kind}"
            )

        action(ns, "snap", "vm", "Snapshot", imageName="vm-snap")
        await done("snap")
        snap = await condition(kube, Image, "vm-snap", ns, timeout=120)
        assert snap.status.format == "qcow2"
        instance(
            ns, "from-snap", flavor=flavor_name, image={"name": "vm-snap"}, userData=MARKER_SCRIPT
        )
        await condition(kube, Instance, "from-snap", ns, timeout=180)
        await wait_console(kube, "from-snap", ns, "marker-found", line=True)
        kubectl("delete", "instance", "from-snap", "-n", ns, "--wait=false")
        assert not list((image_store / "snapshots").glob("*.qcow2")), (
            "snapshot transfer left behind"
        )

        before = await boots()
        action(ns, "rebuild", "vm", "Rebuild", image={"name": "guest"})
        await done("rebuild")
        # A rebuilt root disk starts afresh: the marker is written a second time.
        await eventually(
            lambda: lines("marker-written", 2), timeout=120, what="marker written again"
        )

        action(ns, "resize", "vm", "Resize", flavor=big)
        await done("resize")
        vm = await condition(kube, Instance, "vm", ns, timeout=120)
        assert vm.status.flavor == big and vm.status.vcpus == 2
        await eventually(
            lambda: "CPU(s):         2" in virsh("dominfo", vm.status.domain or ""),
            timeout=60,
            what="the domain restarted with 2 vCPUs",
        )
        await wait_console(kube, "vm", ns, "disk vda 2147483648")

        action(ns, "rescue", "vm", "Rescue")
        await done("rescue")
        vm = await condition(kube, Instance, "vm", ns, timeout=120)
        assert vm.status.rescued is True
        domain = vm.status.domain or ""
        await eventually(
            lambda: (
                "vdy" in virsh("domblklist", domain) and domain_state(domain) == DomainState.RUNNING
            ),
            timeout=60,
            what="running from the rescue disk",
        )
        action(ns, "unrescue", "vm", "Unrescue")
        await done("unrescue")
        vm = await condition(kube, Instance, "vm", ns, timeout=120)
        assert vm.status.rescued is False
        await eventually(
            lambda: (
                "vdy" not in virsh("domblklist", domain)
                and domain_state(domain) == DomainState.RUNNING
            ),
            timeout=60,
            what="running without the rescue disk",
        )

        source = vm.status.node
        action(ns, "migrate", "vm", "Migrate")
        await done("migrate")

        async def moved() -> Instance | None:
            got = await kube.get(Instance, "vm", ns)
            return (
                got if got and got.status.node != source and got.status.is_true("Ready") else None
            )

        vm = await eventually(moved, timeout=180, what="instance on the other node")
        assert domain_state(vm.status.domain) == DomainState.RUNNING
        source_domain = f"nubes-{vm.uid}-{hashlib.sha256((source or '').encode()).hexdigest()[:8]}"
        await eventually(
            lambda: source_domain not in virsh("list", "--all", "--name"),
            timeout=60,
            what="the source node's domain removed",
        )
        await _fresh_boot_found_marker(kube, ns)

        kubectl(
            "patch",
            "instance",
            "vm",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec": {"powerState": "Shelved"}}',
        )

        async def shelved() -> Instance | None:
            got = await kube.get(Instance, "vm", ns)
            return got if got and got.status.node is None and got.status.is_true("Ready") else None

        vm = await eventually(shelved, timeout=180, what="instance shelved")
        assert vm.status.shelved_disk is not None
        shelved_domain = vm.status.domain
        await eventually(
            lambda: domain_state(shelved_domain) == DomainState.ABSENT,
            timeout=60,
            what="the shelved instance's domain removed",
        )
        kubectl(
            "patch",
            "instance",
            "vm",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec": {"powerState": "Running"}}',
        )

        async def unshelved() -> Instance | None:
            got = await kube.get(Instance, "vm", ns)
            ok = got and got.status.node and got.status.power_state == "Running"
            return (
                got if ok and got.status.is_true("Ready") and not got.status.shelved_disk else None
            )

        vm = await eventually(unshelved, timeout=180, what="instance unshelved")
        await _fresh_boot_found_marker(kube, ns)
        assert vm.status.node is not None

        kubectl(
            "patch", "instance", "vm", "-n", ns, "--type=merge", "-p", '{"spec": {"locked": true}}'
        )
        action(ns, "locked", "vm", "HardReboot")
        cond = (
            await condition(kube, InstanceAction, "locked", ns, type_="Stalled")
        ).status.condition("Stalled")
        assert cond.reason == "InstanceLocked"
    finally:
        kubectl(
            "patch",
            "instance",
            "vm",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec": {"locked": false}}',
            check=False,
        )
        kubectl("delete", "instances", "--all", "-n", ns, "--wait=false")
        kubectl("delete", "flavor", big, "--wait=false")

    # A guest stops within the driver's 30 s shutdown timeout, then its
    # disks and ports go; TCG guests on a loaded 2-core machine are slow.
    await instances_gone(kube, ns, agent, timeout=240)
    assert "nubes-" not in virsh("list", "--all", "--name")
    for leftover in ("transfers", "shelved", "snapshots"):
        assert not list(image_store.glob(f"{leftover}/*")), f"{leftover} left in the image store"


async def instances_gone(kube: Kube, ns: str, agents: list[Process], timeout: float) -> None:
    """Wait for the namespace's instances to be gone; if they are not, say
    what holds each (finalizers, node) and what the agents logged of it."""
    try:
        await eventually(lambda: _none_left(kube, ns), timeout=timeout, what="instances deleted")
    except AssertionError as e:
        held = []
        for inst in await kube.list(Instance, ns):
            logs = [
                f"  {a.name}: {line}"
                for a in agents
                for line in a.logs().splitlines()
                if inst.name in line and ns in line
            ]
            held.append(
                f"{inst.key}: finalizers {inst.metadata.finalizers}, node {inst.status.node},"
                f" incoming {inst.status.incoming_node}\n" + "\n".join(logs[-15:])
            )
        raise AssertionError(f"{e}\n" + "\n".join(held)) from None


async def _none_left(kube: Kube, ns: str) -> bool:
    return not await kube.list(Instance, ns)


async def _fresh_boot_found_marker(kube: Kube, ns: str) -> None:
    """After a move or unshelve the console is the new domain's: one boot,
    and the root disk it came with still has the marker."""

    async def probe() -> bool:
        log = await console(kube, "vm", ns)
        return log.count("nubes-guest: boot ") == 1 and said(log, "marker-found") == 1

    await eventually(probe, timeout=120, interval=1, what="marker found on the moved disk")


async def _more(counter: Any, before: int) -> bool:
    return bool(await counter() > before)
