"""Block storage end to end: the controller and a storage node's agent against
the real API server, real files in the node's pools, the real tgtd (exports
checked from the initiator side with QEMU's iSCSI client and CHAP from the
Secret), real backups in the node's backup store.

The agent serves two file pools (backends NODE-fast and NODE-slow) in its
own availability zone, so other nodes of the cluster never take these
volumes; every test removes what it made and checks that nothing is left:
no volume or snapshot files, no tgt targets or CHAP accounts, no Secrets,
no backup containers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Hypervisor, Instance
from nubes.api.image import Image
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot, VolumeType
from nubes.runtime.kube import SECRETS, Kube, path_of
from tests.drivers.storage_helpers import tgt_accounts, tgt_show, tgtd_running, write_at
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.conftest import COMPONENTS_NAMESPACE, start_process
from tests.integration.identity import agent_env

STORAGE = "storage.nubes.io/v1alpha1"
COMPUTE = "compute.nubes.io/v1alpha1"
GIB = 1024**3
MIB = 1024**2
CHAP_SECRET_TYPE = "storage.nubes.io/iscsi-chap"

pytestmark = pytest.mark.skipif(not tgtd_running(), reason="tgtd is not running")


@dataclass
class StorageNode:
    name: str
    root: Path
    proc: Process

    @property
    def zone(self) -> str:
        return self.name

    @property
    def fast(self) -> str:
        return f"{self.name}-fast"

    @property
    def slow(self) -> str:
        return f"{self.name}-slow"

    def pool_dir(self, backend: str) -> Path:
        return self.root / backend.removeprefix(f"{self.name}-")

    def volume_file(self, vol: Volume) -> Path:
        assert vol.status.backend is not None
        return self.pool_dir(vol.status.backend) / "volumes" / f"{vol.uid}.raw"

    def leftovers(self) -> list[str]:
        """Files in the pools and the backup store (work dirs included)."""
        found = []
        for top in ("fast", "slow", "backups"):
            for path in sorted((self.root / top).rglob("*")):
                if path.is_file():
                    found.append(str(path.relative_to(self.root)))
        return found


def start_storage_agent(
    tmp_path_factory: pytest.TempPathFactory, name: str, root: Path, image_store: Path
) -> Process:
    # The chart's agent identity, its token bound to this node's Node.
    env = agent_env(tmp_path_factory.mktemp("tokens"), name)
    return start_process(
        tmp_path_factory,
        f"agent-{name}",
        "agent",
        "--node",
        name,
        "--state-dir",
        str(root),
        "--run-dir",
        str(root / "run"),
        "--availability-zone",
        name,
        "--virt-type",
        "qemu",
        "--volume-backend",
        f"{name}-fast:file:{root / 'fast'}",
        "--volume-backend",
        f"{name}-slow:file:{root / 'slow'}",
        "--backup-store",
        str(root / "backups"),
        "--image-store",
        str(image_store),
        env=env,
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, image_store: Path) -> Iterator[StorageNode]:
    name = f"stor-{uuid.uuid4().hex[:6]}"
    root = tmp_path_factory.mktemp("storage-node")
    proc = start_storage_agent(tmp_path_factory, name, root, image_store)
    storage = StorageNode(name, root, proc)
    yield storage
    storage.proc.stop()
    storage.proc.assert_no_crash()
    kubectl("delete", "hypervisor", name, "--ignore-not-found")


@pytest.fixture(scope="module")
async def ready_node(kube: Kube, controller: Process, node: StorageNode) -> StorageNode:
    async def reported() -> Hypervisor | None:
        hv = await kube.get(Hypervisor, node.name)
        ok = hv is not None and hv.status.is_true("Ready") and len(hv.status.storage_pools) == 2
        return hv if ok else None

    hv = await eventually(reported, timeout=60, what=f"storage pools of {node.name}")
    assert hv.status.iscsi_portal == "127.0.0.1:3260"
    fast = next(p for p in hv.status.storage_pools if p.backend == node.fast)
    assert fast.capabilities["thin_provisioning_support"] == "True"
    assert fast.total_gib > 0 and fast.max_over_subscription_ratio == 20.0
    return node


# --- helpers ------------------------------------------------------------------------------


def volume(ns: str, name: str, size: int, zone: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": STORAGE,
            "kind": "Volume",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"sizeGib": size, "availabilityZone": zone, **spec},
        }
    )


def snapshot(ns: str, name: str, vol: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": STORAGE,
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"volume": vol, **spec},
        }
    )


def backup(ns: str, name: str, vol: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": STORAGE,
            "kind": "VolumeBackup",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"volume": vol, **spec},
        }
    )


def volume_type(name: str, backend: str | None, **spec: Any) -> None:
    body: dict[str, Any] = dict(spec)
    if backend:
        body["backendName"] = backend
    apply({"apiVersion": STORAGE, "kind": "VolumeType", "metadata": {"name": name}, "spec": body})


def instance(ns: str, name: str, *, volumes: list[str], boot: str | None = None) -> None:
    """An instance the compute side never places (its flavor does not exist):
    these tests play the compute agent by writing status.attachedVolumes."""
    spec: dict[str, Any] = {
        "flavor": "no-such-flavor",
        "volumes": [{"volume": v} for v in volumes],
    }
    if boot:
        spec["bootVolume"] = {"name": boot}
    else:
        spec["image"] = {"name": "no-such-image"}
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "Instance",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


async def state(
    kube: Kube,
    kind: type[Any],
    name: str,
    ns: str | None,
    reason: str | Callable[[str], bool] = "Ready",
    timeout: float = 60,
) -> Any:
    """Wait until the object's Ready condition has this reason; return it."""
    matches = reason if callable(reason) else (lambda r: r == reason)

    async def probe() -> Any:
        obj = await kube.get(kind, name, ns)
        cond = obj.status.condition("Ready") if obj is not None else None
        if cond is None or cond.observed_generation != obj.generation:
            return None
        return obj if matches(cond.reason) else None

    async def last() -> str:
        obj = await kube.get(kind, name, ns)
        cond = obj.status.condition("Ready") if obj is not None else None
        return f"{cond.reason}: {cond.message}" if cond else "no condition"

    try:
        return await eventually(probe, timeout=timeout, what=f"{kind.crd.kind} {name} {reason}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last: {await last()}") from None


async def until(
    kube: Kube, name: str, ns: str, test: Callable[[Volume], bool], what: str, timeout: float = 30
) -> Volume:
    """Wait until the volume is Ready for its generation and `test` holds."""

    async def probe() -> Volume | None:
        vol = await kube.get(Volume, name, ns)
        if vol is None or not vol.status.is_true("Ready"):
            return None
        if vol.status.observed_generation != vol.generation:
            return None
        return vol if test(vol) else None

    return await eventually(probe, timeout=timeout, what=f"volume {name}: {what}")


def message(obj: Any) -> str:
    cond = obj.status.condition("Ready")
    return f"{cond.reason}: {cond.message}" if cond else ""


async def gone(kube: Kube, kind: type[Any], name: str, ns: str | None, timeout: float = 60) -> None:
    async def probe() -> bool:
        return await kube.get(kind, name, ns) is None

    await eventually(probe, timeout=timeout, what=f"{kind.crd.kind} {name} deleted")


def delete(kind: str, *names: str, ns: str | None = None) -> None:
    args = ["delete", kind, *names, "--wait=false", "--ignore-not-found"]
    kubectl(*args, *(["-n", ns] if ns else []))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            digest.update(block)
    return digest.hexdigest()


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


async def set_attached(kube: Kube, ns: str, inst: str, volumes: list[str]) -> None:
    """What the compute agent reports once it has attached (or detached)."""
    await kube.patch_raw(
        path_of(Instance), inst, {"status": {"attachedVolumes": volumes}}, ns, subresource="status"
    )


async def no_leaks(kube: Kube, node: StorageNode, ns: str, volume_uids: list[str]) -> None:
    async def clean() -> bool:
        return not node.leftovers()

    await eventually(clean, timeout=30, what=f"empty pools (left: {node.leftovers()})")
    targets = tgt_show()
    for uid in volume_uids:
        assert uid not in targets, f"tgt target of volume {uid} left"
        assert not [a for a in tgt_accounts() if uid in a], f"CHAP account of {uid} left"
    for namespace in (ns, COMPONENTS_NAMESPACE):
        secrets = await kube.list_raw(SECRETS, namespace)
        left = [s["metadata"]["name"] for s in secrets if s["type"] == CHAP_SECRET_TYPE]
        assert not [name for name in left if any(uid in name for uid in volume_uids)]
        if namespace == ns:
            assert not left, f"CHAP Secrets in the project: {left}"


# --- tests ---------------------------------------------------------------------------------


async def test_create_extend_snapshot_clone_and_wipe_on_delete(
    kube: Kube, ready_node: StorageNode, namespace: str, tmp_path: Path
) -> None:
    node, ns = ready_node, namespace
    volume_type(
        f"{node.name}-thin", node.fast, extraSpecs={"thin_provisioning_support": "<is> True"}
    )
    volume_type(f"{node.name}-slow", node.slow)
    try:
        await state(kube, VolumeType, f"{node.name}-thin", None)
        volume(ns, "data", 1, node.zone, volumeType=f"{node.name}-thin")
        vol = await state(kube, Volume, "data", ns)
        assert (vol.status.node, vol.status.backend, vol.status.pool) == (
            node.name,
            node.fast,
            "default",
        )
        assert vol.status.backing is not None and vol.status.backing.size_gib == 1
        path = node.volume_file(vol)
        assert path.stat().st_size == GIB
        assert path.stat().st_blocks == 0, "a new volume is thin"
        pattern = os.urandom(MIB)
        write_at(str(path), 0, pattern)
        write_at(str(path), GIB - MIB, pattern)

        # Extend: the size only grows; the API server refuses a smaller one.
        volume(ns, "data", 2, node.zone, volumeType=f"{node.name}-thin")
        vol = await state(kube, Volume, "data", ns)
        assert vol.status.backing.size_gib == 2
        assert path.stat().st_size == 2 * GIB
        shrink = kubectl(
            "patch",
            "volume",
            "data",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec":{"sizeGib":1}}',
            check=False,
        )
        assert shrink.returncode != 0
        assert "sizeGib can only grow" in shrink.stderr

        snapshot(ns, "snap", "data")
        snap = await state(kube, VolumeSnapshot, "snap", ns)
        assert snap.status.size_gib == 2 and snap.status.node == node.name

        volume(ns, "from-snap", 3, node.zone, source={"snapshot": "snap"})
        volume(ns, "clone", 2, node.zone, source={"volume": "data"})
        from_snap = await state(kube, Volume, "from-snap", ns)
        clone = await state(kube, Volume, "clone", ns)
        for copy in (from_snap, clone):
            assert copy.status.backend == node.fast, "copies stay in their source's pool"
            copy_path = node.volume_file(copy)
            assert read_at(copy_path, 0, MIB) == pattern
            assert read_at(copy_path, GIB - MIB, MIB) == pattern
        assert node.volume_file(from_snap).stat().st_size == 3 * GIB

        volume(ns, "slow", 1, node.zone, volumeType=f"{node.name}-slow")
        slow = await state(kube, Volume, "slow", ns)
        assert slow.status.backend == node.slow

        # Refused while snapshots exist; nothing is lost meanwhile.
        delete("volume", "data", ns=ns)
        refused = await state(kube, Volume, "data", ns, "HasSnapshots")
        assert "snap" in message(refused)
        assert read_at(path, 0, MIB) == pattern

        # A hard link keeps the inode reachable: the wipe must zero it in place.
        witness = tmp_path / "witness.raw"
        os.link(path, witness)
        delete("volumesnapshot", "snap", ns=ns)
        await gone(kube, VolumeSnapshot, "snap", ns)
        await gone(kube, Volume, "data", ns)
        assert not path.exists()
        assert witness.stat().st_size == 2 * GIB
        assert read_at(witness, 0, MIB) == bytes(MIB), "deleted data was not wiped"
        assert read_at(witness, GIB - MIB, MIB) == bytes(MIB)
        witness.unlink()
        uids = [vol.uid, from_snap.uid, clone.uid, slow.uid]
    finally:
        delete("volumes", "--all", ns=ns)
        delete("volumesnapshots", "--all", ns=ns)
        delete("volumetype", f"{node.name}-thin", f"{node.name}-slow")
    for name in ("from-snap", "clone", "slow"):
        await gone(kube, Volume, name, ns)
    await no_leaks(kube, node, ns, uids)


async def test_attachment_export_detach_extend_and_in_use(
    kube: Kube, ready_node: StorageNode, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    node, ns = ready_node, namespace
    try:
        volume(ns, "shared", 1, node.zone, bootable=True)
        vol = await state(kube, Volume, "shared", ns)
        assert vol.status.attachment is None and vol.status.export is None

        instance(ns, "first", volumes=["shared"])
        vol = await until(kube, "shared", ns, lambda v: v.status.export is not None, "exported")
        first = await kube.get(Instance, "first", ns)
        assert first is not None
        assert vol.status.attachment is not None
        assert (vol.status.attachment.instance, vol.status.attachment.instance_uid) == (
            "first",
            first.uid,
        )
        assert vol.status.attachment.boot is False
        export = vol.status.export
        assert export is not None
        assert (export.portal, export.lun) == ("127.0.0.1:3260", 1)
        assert export.iqn == f"iqn.2010-10.io.nubes:volume-{vol.uid}"
        assert export.iqn in tgt_show()

        # The CHAP Secret: in the components' namespace (never the project's),
        # labelled with the volume and its node, and what the target wants.
        assert await kube.get_raw(SECRETS, export.chap_secret, ns) is None
        secret = await kube.get_raw(SECRETS, export.chap_secret, COMPONENTS_NAMESPACE)
        assert secret is not None
        labels = secret["metadata"]["labels"]
        assert labels["storage.nubes.io/volume-uid"] == vol.uid
        assert labels["nubes.io/node"] == vol.status.node
        user = base64.b64decode(secret["data"]["username"]).decode()
        password = base64.b64decode(secret["data"]["password"]).decode()
        assert qemu_sees(export.iqn, user, password) == GIB
        assert qemu_sees(export.iqn, user, "x" + password[1:]) is None

        # A second instance asking for it gets nothing while the first holds it.
        instance(ns, "second", volumes=[], boot="shared")
        vol = await until(kube, "shared", ns, lambda v: "second" in message(v), "second waits")
        assert vol.status.attachment is not None
        assert vol.status.attachment.instance == "first"
        assert "second" in message(vol)

        # Extend waits for the detach.
        volume(ns, "shared", 2, node.zone, bootable=True)
        vol = await state(kube, Volume, "shared", ns, "ExtendWaitingForDetach")
        assert "attached to instance first" in message(vol)
        assert vol.status.backing.size_gib == 1

        # Deleting it is refused while attached.
        delete("volume", "shared", ns=ns)
        vol = await state(kube, Volume, "shared", ns, "InUse")
        assert "instance first" in message(vol)

        # The compute side reports it attached; the user detaches: the
        # attachment (and the export) stay until the compute side lets go.
        await set_attached(kube, ns, "first", ["shared"])
        instance(ns, "first", volumes=[])
        await eventually(
            lambda: _attached_to(kube, ns, "shared", "first"), timeout=10, what="attachment kept"
        )
        vol = await kube.get(Volume, "shared", ns)
        assert vol is not None and vol.status.attachment is not None
        assert vol.status.attachment.instance == "first" and export.iqn in tgt_show()

        # Detached: deleting, the volume goes to no one else (second waits no more).
        await set_attached(kube, ns, "first", [])
        await gone(kube, Volume, "shared", ns)
        assert export.iqn not in tgt_show()
        await no_leaks(kube, node, ns, [vol.uid])
    finally:
        delete("instances", "--all", ns=ns)
        delete("volumes", "--all", ns=ns)


async def test_detach_hands_over_to_the_next_instance_and_extends_between(
    kube: Kube,
    ready_node: StorageNode,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    image_store: Path,
) -> None:
    node, ns = ready_node, namespace
    try:
        volume(ns, "boot", 1, node.zone, bootable=True)
        instance(ns, "a", volumes=["boot"])
        vol = await until(kube, "boot", ns, lambda v: v.status.export is not None, "exported")
        assert vol.status.attachment is not None and vol.status.attachment.instance == "a"
        old_iqn = vol.status.export.iqn

        # Snapshots and backups of an attached volume only when forced.
        snapshot(ns, "hot", "boot")
        backup(ns, "hot-backup", "boot")
        snapshot(ns, "hot-forced", "boot", force=True)
        hot = await state(kube, VolumeSnapshot, "hot", ns, "VolumeAttached")
        assert "attached to instance a" in message(hot) and "force" in message(hot)
        await state(kube, VolumeBackup, "hot-backup", ns, "VolumeAttached")
        forced = await state(kube, VolumeSnapshot, "hot-forced", ns)
        assert forced.status.size_gib == 1
        delete("volumesnapshot", "hot", "hot-forced", ns=ns)
        delete("volumebackup", "hot-backup", ns=ns)
        await gone(kube, VolumeSnapshot, "hot-forced", ns)

        # The agent restarts: the export is re-adopted, nothing is re-created.
        path = node.volume_file(vol)
        inode = path.stat().st_ino
        node.proc.stop()
        node.proc = start_storage_agent(tmp_path_factory, node.name, node.root, image_store)
        vol = await state(kube, Volume, "boot", ns)
        assert path.stat().st_ino == inode and old_iqn in tgt_show()

        # tgtd forgets the target (as after its restart): any pass rebuilds it.
        tid = next(
            line.split()[1].rstrip(":")
            for line in tgt_show().splitlines()
            if line.startswith("Target ") and line.endswith(old_iqn)
        )
        tgtadm = ["tgtadm", "--lld", "iscsi", "--op", "delete", "--mode", "target"]
        subprocess.run([*tgtadm, "--force", "--tid", tid], check=True, capture_output=True)
        assert old_iqn not in tgt_show()
        kubectl("annotate", "volume", "boot", "-n", ns, "test/poke=1")
        await eventually(lambda: old_iqn in tgt_show(), timeout=30, what="export rebuilt")
        secret = await kube.get_raw(SECRETS, vol.status.export.chap_secret, COMPONENTS_NAMESPACE)
        assert secret is not None
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert qemu_sees(old_iqn, data["username"], data["password"]) == GIB

        instance(ns, "a", volumes=[])
        volume(ns, "boot", 2, node.zone, bootable=True)
        vol = await until(kube, "boot", ns, lambda v: v.status.attachment is None, "detached")
        assert vol.status.attachment is None and vol.status.export is None
        assert vol.status.backing.size_gib == 2 and path.stat().st_size == 2 * GIB
        assert old_iqn not in tgt_show(), "export left after detach"

        instance(ns, "b", volumes=[], boot="boot")
        vol = await until(kube, "boot", ns, lambda v: v.status.export is not None, "exported")
        assert vol.status.attachment is not None
        assert (vol.status.attachment.instance, vol.status.attachment.boot) == ("b", True)
        assert vol.status.bootable is True
        delete("instance", "b", "a", ns=ns)
        vol = await until(kube, "boot", ns, lambda v: v.status.attachment is None, "detached")
        assert vol.status.export is None
        delete("volume", "boot", ns=ns)
        await gone(kube, Volume, "boot", ns)
        await no_leaks(kube, node, ns, [vol.uid])
    finally:
        delete("instances", "--all", ns=ns)
        delete("volumes", "--all", ns=ns)


async def test_backup_incremental_restore_byte_identical_and_corruption(
    kube: Kube, ready_node: StorageNode, namespace: str
) -> None:
    node, ns = ready_node, namespace
    try:
        volume(ns, "db", 1, node.zone)
        vol = await state(kube, Volume, "db", ns)
        path = node.volume_file(vol)
        for offset in (0, 100 * MIB, 900 * MIB):
            write_at(str(path), offset, os.urandom(MIB))

        backup(ns, "b-incr-first", "db", incremental=True)
        orphan = await state(kube, VolumeBackup, "b-incr-first", ns, "NoParentBackup")
        assert "take a full backup first" in message(orphan)
        delete("volumebackup", "b-incr-first", ns=ns)

        backup(ns, "full", "db")
        full = await state(kube, VolumeBackup, "full", ns)
        assert full.status.volume_uid == vol.uid and full.status.parent is None
        assert (full.status.chunks, full.status.chunks_stored) == (128, 3)
        assert full.status.container and Path(full.status.container).is_dir()

        write_at(str(path), 100 * MIB, os.urandom(MIB))
        backup(ns, "incr", "db", incremental=True)
        incr = await state(kube, VolumeBackup, "incr", ns)
        assert incr.status.parent == "full"
        assert (incr.status.chunks, incr.status.chunks_stored) == (128, 1)
        expected = sha256_of(path)

        # The backup outlives its volume.
        delete("volume", "db", ns=ns)
        await gone(kube, Volume, "db", ns)
        assert not path.exists()

        volume(ns, "restored", 1, node.zone, source={"backup": "incr"})
        restored = await state(kube, Volume, "restored", ns)
        assert sha256_of(node.volume_file(restored)) == expected

        # A parent goes only after its children.
        delete("volumebackup", "full", ns=ns)
        held = await state(kube, VolumeBackup, "full", ns, "HasDependentBackups")
        assert "incr" in message(held)

        # A corrupt chunk: the restore stops and says which chunk.
        container = Path(incr.status.container)
        chunk = next(p for p in sorted(container.iterdir()) if p.name.startswith("chunk-"))
        blob = bytearray(chunk.read_bytes())
        blob[100] ^= 0xFF
        chunk.write_bytes(bytes(blob))
        volume(ns, "bad-restore", 1, node.zone, source={"backup": "incr"})
        bad = await state(kube, Volume, "bad-restore", ns, "BackupCorrupt")
        index = int(chunk.name.split("-")[1].split(".")[0])
        assert f"chunk {index}" in message(bad) and "bad-restore" in message(bad)
        assert bad.status.backing is None or not bad.status.backing.source_done
        assert bad.status.node_problem is not None and not bad.status.node_problem.retryable

        delete("volume", "bad-restore", "restored", ns=ns)
        delete("volumebackup", "incr", ns=ns)
        await gone(kube, VolumeBackup, "incr", ns)
        await gone(kube, VolumeBackup, "full", ns)
        await gone(kube, Volume, "bad-restore", ns)
        await gone(kube, Volume, "restored", ns)
        await no_leaks(kube, node, ns, [vol.uid, restored.uid, bad.uid])
    finally:
        delete("volumes", "--all", ns=ns)
        delete("volumebackups", "--all", ns=ns)


async def test_volume_from_an_image_holds_it_and_boots(
    kube: Kube, ready_node: StorageNode, namespace: str, workdir: Path
) -> None:
    node, ns = ready_node, namespace
    raw = workdir / f"{ns}-image.raw"
    qcow2 = workdir / f"{ns}-image.qcow2"
    data = os.urandom(3 * MIB)
    raw.write_bytes(data)
    run = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)]
    subprocess.run(run, check=True, capture_output=True)
    grow = ["qemu-img", "resize", "-f", "qcow2", str(qcow2), "1536M"]
    subprocess.run(grow, check=True, capture_output=True)
    qcow2.chmod(0o644)
    try:
        apply(
            {
                "apiVersion": "image.nubes.io/v1alpha1",
                "kind": "Image",
                "metadata": {"name": "tiny", "namespace": ns},
                "spec": {
                    "source": {"url": f"file://{qcow2}"},
                    "diskFormat": "qcow2",
                    "sha256": sha256_of(qcow2),
                },
            }
        )
        volume(ns, "too-small", 1, node.zone, source={"image": {"name": "tiny"}})
        small = await state(kube, Volume, "too-small", ns, "VolumeTooSmall", timeout=90)
        assert "needs 2 GiB" in message(small)

        volume(ns, "root", 2, node.zone, source={"image": {"name": "tiny"}})
        vol = await state(kube, Volume, "root", ns, timeout=90)
        assert vol.status.bootable is True, "a volume made from an image is bootable"
        path = node.volume_file(vol)
        assert read_at(path, 0, 3 * MIB) == data
        assert read_at(path, 3 * MIB, MIB) == bytes(MIB)
        assert path.stat().st_blocks * 512 < 64 * MIB, "the copy keeps the volume thin"
        delete("volume", "root", "too-small", ns=ns)
        await gone(kube, Volume, "root", ns)
        await gone(kube, Volume, "too-small", ns)
        await no_leaks(kube, node, ns, [vol.uid])
    finally:
        delete("volumes", "--all", ns=ns)
        delete("images", "--all", ns=ns)
        raw.unlink(missing_ok=True)
        qcow2.unlink(missing_ok=True)


async def test_bad_requests_stall_with_reasons_and_lose_nothing(
    kube: Kube, ready_node: StorageNode, namespace: str
) -> None:
    node, ns = ready_node, namespace
    other = f"{namespace}-other"
    kubectl("create", "namespace", other)
    try:
        volume(ns, "keep", 1, node.zone)
        keep = await state(kube, Volume, "keep", ns)

        volume_type(f"{node.name}-ghost", f"{node.name}-ghost")
        ghost = await state(kube, VolumeType, f"{node.name}-ghost", None, "NoSuchBackend")
        assert f"needs backend {node.name}-ghost" in message(ghost)
        volume(ns, "ghostly", 1, node.zone, volumeType=f"{node.name}-ghost")
        stalled = await state(kube, Volume, "ghostly", ns, "NoValidBackend")
        assert f"2 not backend {node.name}-ghost" in message(stalled)

        volume(ns, "huge", 65536, node.zone)
        huge = await state(kube, Volume, "huge", ns, "NoValidBackend")
        assert "2 insufficient capacity (needs 65536 GiB, at most" in message(huge)

        volume(ns, "nowhere", 1, f"{node.zone}-elsewhere")
        nowhere = await state(kube, Volume, "nowhere", ns, "NoValidBackend")
        assert "wrong availability zone" in message(nowhere)
        assert "not backend" not in message(nowhere)

        volume(ns, "typo", 1, node.zone, volumeType="no-such-type")
        typo = await state(kube, Volume, "typo", ns, "VolumeTypeNotFound")
        assert "no-such-type" in message(typo)

        apply(
            {
                "apiVersion": "image.nubes.io/v1alpha1",
                "kind": "Image",
                "metadata": {"name": "private", "namespace": other},
                "spec": {"source": {"url": "file:///nonexistent.raw"}, "diskFormat": "raw"},
            }
        )
        volume(
            ns, "stolen", 1, node.zone, source={"image": {"name": "private", "namespace": other}}
        )
        stolen = await state(kube, Volume, "stolen", ns, "ImageNotVisible")
        assert f"image {other}/private is private" in message(stolen)

        volume_type(f"{node.name}-ghost", node.fast)  # the operator fixes the type
        await state(kube, VolumeType, f"{node.name}-ghost", None)
        fixed = await state(kube, Volume, "ghostly", ns)
        assert fixed.status.backend == node.fast

        # None of it touched the volume that was there.
        keep_now = await kube.get(Volume, "keep", ns)
        assert keep_now is not None and keep_now.status.is_true("Ready")
        assert node.volume_file(keep_now).exists() and keep_now.uid == keep.uid
        nothing = [v for v in ("huge", "nowhere", "typo", "stolen") if await _placed(kube, ns, v)]
        assert not nothing, f"placed although refused: {nothing}"
    finally:
        delete("volumes", "--all", ns=ns)
        delete("volumebackups", "--all", ns=ns)
        delete("volumetype", f"{node.name}-ghost")
        kubectl("delete", "namespace", other, "--wait=false")
    for name in ("keep", "ghostly", "huge", "nowhere", "typo", "stolen"):
        await gone(kube, Volume, name, ns)
    await no_leaks(kube, node, ns, [keep.uid])


# --- small probes -------------------------------------------------------------------------


def qemu_sees(iqn: str, user: str, password: str) -> int | None:
    """Virtual size QEMU's iSCSI initiator reads through the export, or None."""
    opts = ",".join(
        [
            "driver=raw",
            "file.driver=iscsi",
            "file.transport=tcp",
            "file.portal=127.0.0.1:3260",
            f"file.target={iqn}",
            "file.lun=1",
            f"file.user={user}",
            f"file.password={password}",
        ]
    )
    done = subprocess.run(
        ["qemu-img", "info", "--output", "json", "--image-opts", opts],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return None
    size: int = json.loads(done.stdout)["virtual-size"]
    return size


async def _attached_to(kube: Kube, ns: str, name: str, inst: str) -> bool:
    vol = await kube.get(Volume, name, ns)
    return (
        vol is not None
        and vol.status.attachment is not None
        and (vol.status.attachment.instance == inst)
    )


async def _placed(kube: Kube, ns: str, name: str) -> bool:
    vol = await kube.get(Volume, name, ns)
    return vol is not None and vol.status.node is not None


async def test_a_node_failure_shows_on_the_volume(
    kube: Kube, ready_node: StorageNode, namespace: str, workdir: Path, image_store: Path
) -> None:
    """The storage node cannot fill a volume (the image's store copy vanished
    after the import): the volume says so, with the node's reason, within
    the failing pass; once the copy is back the agent's retry fills it."""
    node, ns = ready_node, namespace
    raw = workdir / f"{ns}-vanishing.raw"
    data = os.urandom(2 * MIB)
    raw.write_bytes(data)
    raw.chmod(0o644)
    try:
        apply(
            {
                "apiVersion": "image.nubes.io/v1alpha1",
                "kind": "Image",
                "metadata": {"name": "vanishing", "namespace": ns},
                "spec": {
                    "source": {"url": f"file://{raw}"},
                    "diskFormat": "raw",
                    "sha256": sha256_of(raw),
                },
            }
        )

        async def imported() -> Image | None:
            img = await kube.get(Image, "vanishing", ns)
            return img if img is not None and img.status.is_true("Ready") else None

        img = await eventually(imported, timeout=90, what="image imported")
        stored = image_store / img.uid
        assert stored.is_file()
        stored.unlink()

        volume(ns, "orphan", 1, node.zone, source={"image": {"name": "vanishing"}})
        vol = await state(kube, Volume, "orphan", ns, "ImageFetchFailed", timeout=60)
        problem = vol.status.node_problem
        assert problem is not None and problem.node == node.name and problem.retryable
        assert "filling volume orphan from image" in problem.message
        assert f"node {node.name}" in message(vol)
        reconciling = vol.status.condition("Reconciling")
        assert reconciling is not None and reconciling.reason == "ImageFetchFailed"

        stored.write_bytes(raw.read_bytes())
        stored.chmod(0o600)
        vol = await state(kube, Volume, "orphan", ns, timeout=120)
        assert vol.status.node_problem is None
        assert read_at(node.volume_file(vol), 0, 2 * MIB) == data
        delete("volume", "orphan", ns=ns)
        await gone(kube, Volume, "orphan", ns)
        await no_leaks(kube, node, ns, [vol.uid])
    finally:
        delete("volumes", "--all", ns=ns)
        delete("images", "--all", ns=ns)
        raw.unlink(missing_ok=True)
