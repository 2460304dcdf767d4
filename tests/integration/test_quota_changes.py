"""Quotas that change with what a project's objects do, against the real API
server, the controller and a real storage/compute agent: snapshots and
backups count toward `gigabytes` with volumes; an extend, a restore, a
Resize and an unshelve count the difference and are refused past the limit
with the message, holding nothing and leaving what exists untouched;
deleting gives back, and what waits takes it.

(test_quotas.py covers creation, concurrency and counts without a node.)
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Hypervisor, Instance, InstanceAction
from nubes.api.identity import Project
from nubes.api.image import Image
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot
from nubes.runtime.kube import Kube, path_of
from tests.drivers.storage_helpers import tgtd_running
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import COMPUTE, condition, flavor, image
from tests.integration.conftest import get_condition
from tests.integration.test_quotas import ledger, refused, usage
from tests.integration.test_storage import StorageNode, no_leaks, start_storage_agent

STORAGE = "storage.nubes.io/v1alpha1"
MEMBER = "quota-changes-bob"

pytestmark = pytest.mark.skipif(not tgtd_running(), reason="tgtd is not running")


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[StorageNode]:
    """One real agent: file pools, a backup store, and libvirt for guests
    (its state below the world-traversable workdir: QEMU runs as its own user)."""
    name = f"qc-{uuid.uuid4().hex[:6]}"
    root = workdir / f"agent-{name}"
    root.mkdir(mode=0o755)
    proc = start_storage_agent(tmp_path_factory, name, root, image_store)
    yield StorageNode(name, root, proc)
    proc.stop()
    proc.assert_no_crash()
    kubectl("delete", "hypervisor", name, "--ignore-not-found")


@pytest.fixture(scope="module")
async def ready_node(kube: Kube, controller: Process, node: StorageNode) -> StorageNode:
    async def reported() -> bool:
        hv = await kube.get(Hypervisor, node.name)
        return hv is not None and hv.status.is_true("Ready") and len(hv.status.storage_pools) == 2

    await eventually(reported, timeout=60, what=f"agent {node.name} reporting")
    return node


ProjectFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def project(kube: Kube, ready_node: StorageNode) -> AsyncIterator[ProjectFactory]:
    made: list[str] = []

    async def make(**quotas: int) -> str:
        name = f"qc-{uuid.uuid4().hex[:6]}"
        apply(
            {
                "apiVersion": "identity.nubes.io/v1alpha1",
                "kind": "Project",
                "metadata": {"name": name},
                "spec": {"members": [{"name": MEMBER, "role": "member"}], "quotas": quotas},
            }
        )
        made.append(name)

        async def ready() -> bool:
            cond = await get_condition(kube, path_of(Project), name, None)
            return bool(cond and cond["status"] == "True")

        await eventually(ready, timeout=60, what=f"project {name} Ready")
        return name

    yield make
    for name in made:
        kubectl("delete", "project", name, "--wait=false", check=False)
    for name in made:

        async def gone(n: str = name) -> bool:
            return await kube.get(Project, n) is None

        await eventually(gone, timeout=180, what=f"project {name} deleted")


def as_member(kind: str, ns: str, name: str, spec: dict[str, Any], api: str = STORAGE) -> None:
    manifest = {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    apply(manifest, user=MEMBER)


def delete(kind: str, ns: str, *names: str) -> None:
    kubectl("delete", kind, *names, "-n", ns, "--wait=false", user=MEMBER)


async def ready(kube: Kube, kind: type[Any], name: str, ns: str, timeout: float = 60) -> Any:
    async def probe() -> Any:
        obj = await kube.get(kind, name, ns)
        cond = obj.status.condition("Ready") if obj else None
        ok = cond and cond.status == "True" and cond.observed_generation == obj.generation
        return obj if ok else None

    return await eventually(probe, timeout=timeout, what=f"{kind.crd.kind} {name} Ready")


async def gone(kube: Kube, kind: type[Any], name: str, ns: str) -> None:
    async def probe() -> bool:
        return await kube.get(kind, name, ns) is None

    await eventually(probe, timeout=60, what=f"{kind.crd.kind} {name} deleted")


async def holds_nothing(kube: Kube, kind: type[Any], name: str, ns: str) -> None:
    """Refused: no ledger entry, and never handed to a node."""
    obj = await kube.get(kind, name, ns)
    assert obj is not None
    assert obj.uid not in await ledger(kube, ns)
    assert obj.status.node is None


async def test_snapshots_backups_extend_and_restore_count_gigabytes(
    kube: Kube, project: ProjectFactory, ready_node: StorageNode
) -> None:
    node = ready_node
    ns = await project(gigabytes=3)
    zone = {"availabilityZone": node.zone}
    as_member("Volume", ns, "v", {"sizeGib": 1, **zone})
    vol = await ready(kube, Volume, "v", ns)
    await usage(kube, ns, "gigabytes", "1/3")

    # A snapshot and a backup hold their volume's size, as in Cinder.
    as_member("VolumeSnapshot", ns, "s1", {"volume": "v"})
    await ready(kube, VolumeSnapshot, "s1", ns)
    await usage(kube, ns, "gigabytes", "2/3")
    as_member("VolumeBackup", ns, "b1", {"volume": "v"})
    await ready(kube, VolumeBackup, "b1", ns)
    await usage(kube, ns, "gigabytes", "3/3")

    # Beyond the limit: refused with the message, nothing reserved or taken.
    as_member("VolumeSnapshot", ns, "s2", {"volume": "v"})
    as_member("VolumeBackup", ns, "b2", {"volume": "v"})
    as_member("Volume", ns, "r", {"sizeGib": 1, "source": {"backup": "b1"}, **zone})
    assert await refused(kube, VolumeSnapshot, "s2", ns) == (
        "gigabytes: 3 of 3 in use, this snapshot needs 1"
    )
    assert await refused(kube, VolumeBackup, "b2", ns) == (
        "gigabytes: 3 of 3 in use, this backup needs 1"
    )
    assert await refused(kube, Volume, "r", ns) == "gigabytes: 3 of 3 in use, this volume needs 1"
    for kind, name in ((VolumeSnapshot, "s2"), (VolumeBackup, "b2"), (Volume, "r")):
        await holds_nothing(kube, kind, name, ns)
    delete("volumesnapshot", ns, "s2")
    delete("volumebackup", ns, "b2")
    delete("volume", ns, "r")
    for kind, name in ((VolumeSnapshot, "s2"), (VolumeBackup, "b2"), (Volume, "r")):
        await gone(kube, kind, name, ns)
    await usage(kube, ns, "gigabytes", "3/3")
    assert len(await ledger(kube, ns)) == 3

    # An extend counts the difference; the volume stays as it is meanwhile.
    as_member("Volume", ns, "v", {"sizeGib": 2, **zone})
    assert await refused(kube, Volume, "v", ns) == (
        "gigabytes: 3 of 3 in use, this volume needs 1 more"
    )
    vol = await kube.get(Volume, "v", ns)
    assert vol is not None and vol.status.granted_size_gib == 1
    assert vol.status.backing is not None and vol.status.backing.size_gib == 1
    assert node.volume_file(vol).stat().st_size == 1024**3

    # Deleting the backup gives its gigabyte back: the waiting extend takes it.
    delete("volumebackup", ns, "b1")
    await gone(kube, VolumeBackup, "b1", ns)
    vol = await ready(kube, Volume, "v", ns)
    assert vol.status.backing is not None and vol.status.backing.size_gib == 2
    assert (await ledger(kube, ns))[vol.uid].gigabytes == 2
    await usage(kube, ns, "gigabytes", "3/3")
    delete("volumesnapshot", ns, "s1")
    await gone(kube, VolumeSnapshot, "s1", ns)
    await usage(kube, ns, "gigabytes", "2/3")
    delete("volume", ns, "v")
    await gone(kube, Volume, "v", ns)
    await usage(kube, ns, "gigabytes", "0/3")
    assert await ledger(kube, ns) == {}
    await no_leaks(kube, node, ns, [vol.uid])


@pytest.fixture(scope="module")
def blank_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk with nothing to boot: the guest sits in its firmware, which
    is all a Resize needs and costs the node little."""
    path = tmp_path_factory.mktemp("quota-image") / "blank.raw"
    path.write_bytes(bytes(1024**2))
    return path


async def compute_ledger(kube: Kube, ns: str) -> dict[str, Any]:
    """The ledger without the image the instance boots from (it holds its MiB)."""
    return {uid: r for uid, r in (await ledger(kube, ns)).items() if r.kind != "Image"}


async def test_resize_and_unshelve_count_cores_and_ram(
    kube: Kube, project: ProjectFactory, ready_node: StorageNode, blank_image: Path
) -> None:
    node = ready_node
    for name, vcpus, ram in (("qc.c1", 1, 256), ("qc.c2", 2, 512), ("qc.c4", 4, 512)):
        flavor(name, vcpus=vcpus, ramMib=ram)
    ns = await project(cores=2, ramMib=768)
    image(ns, "blank", blank_image, None, fmt="raw")
    await condition(kube, Image, "blank", ns, timeout=60)
    spec = {"flavor": "qc.c1", "image": {"name": "blank"}, "availabilityZone": node.zone}
    as_member("Instance", ns, "vm", spec, api=COMPUTE)
    vm = await condition(kube, Instance, "vm", ns, timeout=120)
    assert vm.status.node == node.name
    await usage(kube, ns, "cores", "1/2")
    await usage(kube, ns, "ram_mib", "256/768")

    def power(ns: str, state: str) -> None:
        body = f'{{"spec":{{"powerState":"{state}"}}}}'
        kubectl("patch", "instance", "vm", "-n", ns, "--type=merge", "-p", body, user=MEMBER)

    def resize(name: str, to: str) -> None:
        as_member(
            "InstanceAction", ns, name, {"instance": "vm", "action": "Resize", "flavor": to},
            api=COMPUTE,
        )  # fmt: skip

    # Growth past the limit: refused with the difference, the instance untouched.
    resize("too-big", "qc.c4")
    assert await refused(kube, InstanceAction, "too-big", ns) == (
        "cores: 1 of 2 in use, this resize needs 3"
    )
    action = await kube.get(InstanceAction, "too-big", ns)
    assert action is not None and not action.status.flavor and not action.status.started_at
    assert action.uid not in await ledger(kube, ns)
    vm = await condition(kube, Instance, "vm", ns)
    assert (vm.status.flavor, vm.status.vcpus, vm.status.ram_mib) == ("qc.c1", 1, 256)
    delete("instanceaction", ns, "too-big")
    await gone(kube, InstanceAction, "too-big", ns)

    # Within the limit: the Resize reserves the difference, and once done the
    # instance holds its new flavor.
    resize("grow", "qc.c2")

    async def resized() -> Instance | None:
        got = await kube.get(Instance, "vm", ns)
        done = await kube.get(InstanceAction, "grow", ns)
        ok = got and got.status.flavor == "qc.c2" and got.status.is_true("Ready")
        return got if ok and done and done.status.completed_at else None

    vm = await eventually(resized, timeout=180, what="vm resized to qc.c2")
    assert (vm.status.vcpus, vm.status.ram_mib) == (2, 512)
    await usage(kube, ns, "cores", "2/2")
    await usage(kube, ns, "ram_mib", "512/768")

    async def only_the_instance() -> bool:
        held = await compute_ledger(kube, ns)
        return set(held) == {vm.uid} and (held[vm.uid].cores, held[vm.uid].ram_mib) == (2, 512)

    await eventually(only_the_instance, timeout=30, what="the Resize's entry handed over")

    # Shelved and offloaded, the instance holds no cores or RAM; unshelving
    # reserves them again, and waits while the quota has no room.
    power(ns, "Shelved")

    async def shelved() -> Instance | None:
        got = await kube.get(Instance, "vm", ns)
        ok = got and got.status.node is None and got.status.shelved_disk is not None
        return got if ok and got.status.is_true("Ready") else None

    await eventually(shelved, timeout=120, what="vm shelved")
    await usage(kube, ns, "cores", "0/2")
    await usage(kube, ns, "ram_mib", "0/768")
    kubectl("patch", "project", ns, "--type=merge", "-p", '{"spec":{"quotas":{"cores":1}}}')
    await usage(kube, ns, "cores", "0/1")
    power(ns, "Running")
    assert await refused(kube, Instance, "vm", ns) == "cores: 0 of 1 in use, this instance needs 2"
    vm = await kube.get(Instance, "vm", ns)
    assert vm is not None and vm.status.node is None and vm.status.shelved_disk is not None
    assert await compute_ledger(kube, ns) == {}
    # Room again: the waiting unshelve goes on by itself.
    kubectl("patch", "project", ns, "--type=merge", "-p", '{"spec":{"quotas":{"cores":2}}}')

    async def unshelved() -> Instance | None:
        got = await kube.get(Instance, "vm", ns)
        ok = got and got.status.node == node.name and got.status.power_state == "Running"
        return got if ok and got.status.is_true("Ready") and not got.status.shelved_disk else None

    await eventually(unshelved, timeout=120, what="vm unshelved")
    await usage(kube, ns, "cores", "2/2")
    await usage(kube, ns, "ram_mib", "512/768")
    delete("instance", ns, "vm")
    await gone(kube, Instance, "vm", ns)
    await usage(kube, ns, "cores", "0/2")
    for name in ("qc.c1", "qc.c2", "qc.c4"):
        kubectl("delete", "flavor", name, "--ignore-not-found", "--wait=false")
