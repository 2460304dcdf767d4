"""Images, flavors and instances end to end: the controller imports the image
(checksum, inspection), schedules and makes ports; the node agent boots the
test guest under libvirt/QEMU (TCG) from its disk's bootloader, plugged into
OVS, and the guest gets its port's address by DHCP (seen on its console)."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Hypervisor, Instance
from nubes.api.image import Image
from nubes.drivers.compute.libvirt import DomainState, LibvirtCompute
from nubes.runtime.kube import CONFIGMAPS, Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    IMAGE,
    condition,
    network,
    node_name,
    start_agent,
    subnet,
)
from tests.nodes import Fabric, sh


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["c1", "c2"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[list[Process]]:
    procs = [
        start_agent(fabric, node, tmp_path_factory, state_root=workdir, image_store=image_store)
        for node in fabric.nodes
    ]
    yield procs
    for proc in procs:
        proc.stop()
        proc.assert_no_crash()
    for node in fabric.nodes:
        kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")


@pytest.fixture(scope="module")
def guest_image() -> tuple[Path, str]:
    path = build_guest_image()
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def flavor(name: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "Flavor",
            "metadata": {"name": name},
            "spec": {"vcpus": 1, "ramMib": 256, "diskGib": 1, **spec},
        }
    )


def image(ns: str, name: str, path: Path, sha256: str | None, fmt: str = "qcow2") -> None:
    spec: dict[str, Any] = {"source": {"url": path.as_uri()}, "diskFormat": fmt}
    if sha256:
        spec["sha256"] = sha256
    apply(
        {
            "apiVersion": IMAGE,
            "kind": "Image",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def instance(ns: str, name: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "Instance",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


async def console(kube: Kube, inst: str, ns: str) -> str:
    cm = await kube.get_raw(CONFIGMAPS, f"{inst}-console", ns)
    return str((cm or {}).get("data", {}).get("console.log", ""))


async def wait_console(kube: Kube, inst: str, ns: str, text: str, timeout: float = 120) -> str:
    async def probe() -> str | None:
        log = await console(kube, inst, ns)
        return log if text in log else None

    try:
        return await eventually(
            probe, timeout=timeout, interval=1, what=f"{text!r} on {inst}'s console"
        )
    except AssertionError as e:
        ports = kubectl("get", "ports", "-n", ns, "-o", "yaml").stdout
        raise AssertionError(
            f"{e}\nconsole:\n{await console(kube, inst, ns)}\nports:\n{ports}"
        ) from None


def domain_state(name: str | None) -> DomainState:
    if name is None:
        return DomainState.ABSENT
    compute = LibvirtCompute()
    try:
        return compute.state(name)
    finally:
        compute.close()


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
    assert f"tap{vm.uid.replace('-', '')[:11]}" not in taps
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
