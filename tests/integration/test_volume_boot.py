"""Volumes with instances, end to end (real tgtd, libvirt/QEMU, OVS): the
Tempest volume-boot pattern, and a data volume hot-plugged into a running
guest and unplugged again, through QEMU's own iSCSI initiator with CHAP."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Instance
from nubes.api.storage import Volume, VolumeSnapshot
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    MARKER_SCRIPT,
    agent_of_the_node,
    condition,
    console,
    flavor,
    image,
    iscsi_secrets,
    network,
    node_name,
    one_node_fabric,
    said,
    subnet,
    virsh,
    wait_console,
)
from tests.nodes import Fabric, sh

STORAGE = "storage.nubes.io/v1alpha1"


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    yield from one_node_fabric(tmp_path_factory, "v1")


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[Process]:
    yield from agent_of_the_node(
        fabric, tmp_path_factory, state_root=workdir, image_store=image_store
    )


@pytest.fixture
async def cleanup(kube: Kube, namespace: str, agent: Process) -> AsyncIterator[None]:
    """Instances first, then volumes, while the agent runs (its finalizers)."""
    yield
    uids = [i.uid for i in await kube.list(Instance, namespace)]
    for kinds, kind in (
        ("instances", Instance),
        ("volumesnapshots", VolumeSnapshot),
        ("volumes", Volume),
    ):
        kubectl("delete", kinds, "--all", "-n", namespace, "--wait=false", check=False)

        async def gone(k: Any = kind) -> bool:
            return not await kube.list(k, namespace)

        await eventually(gone, timeout=180, what=f"{kinds} deleted")
    for uid in uids:
        assert not iscsi_secrets(uid), "CHAP secrets left in libvirt"


def volume(ns: str, name: str, size: int, **spec: Any) -> None:
    apply(
        {
            "apiVersion": STORAGE,
            "kind": "Volume",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"sizeGib": size, **spec},
        }
    )


def targets() -> str:
    return sh("tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "target").stdout


async def test_boot_from_volume_snapshot_and_hotplug(
    kube: Kube,
    controller: Process,
    agent: Process,
    fabric: Fabric,
    namespace: str,
    cleanup: None,
    workdir: Path,
) -> None:
    ns = namespace
    zone = fabric.prefix
    path = build_guest_image()
    image(ns, "guest", path, hashlib.sha256(path.read_bytes()).hexdigest())
    tiny = f"vb-{uuid.uuid4().hex[:6]}"
    flavor(tiny, diskGib=0)
    network(ns, "net", fabric, type="vxlan")
    subnet(ns, "net-v4", "net", "10.40.0.0/24")

    def boot(name: str, vol: str, **spec: Any) -> None:
        apply(
            {
                "apiVersion": COMPUTE,
                "kind": "Instance",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "flavor": tiny,
                    "bootVolume": {"name": vol},
                    "availabilityZone": zone,
                    "networks": [{"network": {"name": "net"}}],
                    "userData": MARKER_SCRIPT,
                    **spec,
                },
            }
        )

    try:
        volume(ns, "root", 1, source={"image": {"name": "guest"}}, availabilityZone=zone)
        root = await condition(kube, Volume, "root", ns, timeout=180)
        assert root.status.bootable is True

        boot("vm1", "root")
        vm1 = await condition(kube, Instance, "vm1", ns, timeout=180)
        assert "root" in vm1.status.attached_volumes
        blk = virsh("domblklist", vm1.status.domain or "")
        assert "iqn." in blk, f"the root disk must be the iSCSI volume: {blk}"
        await wait_console(kube, "vm1", ns, "marker-written", line=True)
        kubectl("delete", "instance", "vm1", "-n", ns)

        async def released() -> bool:
            vol = await kube.get(Volume, "root", ns)
            return vol is not None and vol.status.attachment is None and vol.status.export is None

        await eventually(released, timeout=120, what="volume detached and unexported")
        assert root.uid not in targets()

        boot("vm2", "root")
        vm2 = await condition(kube, Instance, "vm2", ns, timeout=180)
        await wait_console(kube, "vm2", ns, "marker-found", line=True)

        apply(
            {
                "apiVersion": STORAGE,
                "kind": "VolumeSnapshot",
                "metadata": {"name": "snap", "namespace": ns},
                "spec": {"volume": "root", "force": True},
            }
        )
        await condition(kube, VolumeSnapshot, "snap", ns, timeout=120)
        volume(ns, "copy", 1, source={"snapshot": "snap"}, availabilityZone=zone)
        await condition(kube, Volume, "copy", ns, timeout=120)
        boot("vm3", "copy")
        await condition(kube, Instance, "vm3", ns, timeout=180)
        await wait_console(kube, "vm3", ns, "marker-found", line=True)

        # A blank data volume, hot-plugged into the running vm2 and out again.
        volume(ns, "data", 2, availabilityZone=zone)
        data = await condition(kube, Volume, "data", ns, timeout=120)
        boot("vm2", "root", volumes=[{"volume": "data"}])

        async def attached() -> bool:
            got = await kube.get(Instance, "vm2", ns)
            return got is not None and "data" in got.status.attached_volumes

        await eventually(attached, timeout=120, what="data volume attached")
        log = await wait_console(kube, "vm2", ns, "disk-added", timeout=60)
        assert any(
            line.strip().startswith("nubes-guest: disk-added vd")
            and line.strip().endswith(" 2147483648")
            for line in log.splitlines()
        ), log
        assert data.uid in targets()

        boot("vm2", "root", volumes=[])
        await wait_console(kube, "vm2", ns, "disk-removed", timeout=60)

        async def unexported() -> bool:
            vol = await kube.get(Volume, "data", ns)
            return vol is not None and vol.status.export is None and data.uid not in targets()

        await eventually(unexported, timeout=120, what="data volume unexported")
        got = await kube.get(Instance, "vm2", ns)
        assert got is not None and "data" not in got.status.attached_volumes
        assert [u for u in iscsi_secrets(got.uid) if "-data-" in u] == []
        assert said(await console(kube, "vm2", ns), "marker-found") >= 1
    finally:
        kubectl("delete", "flavor", tiny, "--wait=false", check=False)
    assert vm2.status.node == node_name(fabric, fabric.nodes[0])
    assert workdir.exists()
