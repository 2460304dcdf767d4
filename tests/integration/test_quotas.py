"""Project quotas against the real API server and two controller shards,
driven by an impersonated project member: counts refused at admission by the
API server's ResourceQuota, sums (cores, RAM, gigabytes) held in the
Project's ledger (image MiB too), never overshot by concurrent creations; usage in the
Project's status and `kubectl get projects`. No node is needed: instances
and volumes reserve before they are placed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Instance
from nubes.api.identity import Project
from nubes.api.image import Image
from nubes.api.storage import Volume
from nubes.runtime.kube import RESOURCEQUOTAS, Kube
from tests.helpers import ROOT, Process, apply, eventually, free_port, kubectl
from tests.integration.cloud import COMPUTE, IMAGE, NET, flavor, image
from tests.integration.conftest import controller_argv, start_controller

QUOTA = "nubes-project-quotas"
STORAGE = "storage.nubes.io/v1alpha1"
MEMBER = "quota-bob"


@pytest.fixture(scope="module")
def quota_controller() -> Iterator[None]:
    """The API server counts objects for ResourceQuotas only with the
    controller-manager's resourcequota controller (hack/cluster.sh runs it);
    a control plane started before that gets a quota-only one for the tests."""
    state = Path(os.environ.get("NUBES_STATE", ROOT / ".nubes"))
    pid = (state / "run" / "kube-controller-manager.pid").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    if any("resourcequota" in a for a in argv):
        yield
        return
    binary = argv[0]
    log = open(state / "logs" / "kcm-quota-tests.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            "--kubeconfig",
            str(state / "kcm.kubeconfig"),
            "--authentication-kubeconfig",
            str(state / "kcm.kubeconfig"),
            "--authorization-kubeconfig",
            str(state / "kcm.kubeconfig"),
            "--controllers",
            "resourcequota",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            str(free_port()),
            "--leader-elect=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    yield
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def shards(
    tmp_path_factory: pytest.TempPathFactory, image_store: Path, quota_controller: None
) -> Iterator[list[Process]]:
    """Two controller processes, each with its own workers, splitting the
    objects by uid: the ledger must hold against both at once."""
    procs = [
        start_controller(
            tmp_path_factory,
            *controller_argv(image_store, "--shard", f"{i}/2"),
            name=f"controller-{i}",
        )
        for i in range(2)
    ]
    yield procs
    for proc in procs:
        proc.stop()
    for proc in procs:
        proc.assert_no_crash()


@pytest.fixture(scope="module", autouse=True)
def flavors() -> None:
    flavor("quota.c1", vcpus=1, ramMib=256)
    flavor("quota.c2", vcpus=2, ramMib=512)


ProjectFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def project(kube: Kube, shards: list[Process]) -> AsyncIterator[ProjectFactory]:
    made: list[str] = []

    async def make(**quotas: int) -> str:
        name = f"q-{uuid.uuid4().hex[:6]}"
        apply(
            {
                "apiVersion": "identity.nubes.io/v1alpha1",
                "kind": "Project",
                "metadata": {"name": name},
                "spec": {"members": [{"name": MEMBER, "role": "member"}], "quotas": quotas},
            }
        )
        made.append(name)

        async def counted() -> bool:
            # Until the quota controller has counted, the API server refuses
            # every creation the quota covers ("status unknown for quota").
            rq = await kube.get_raw(RESOURCEQUOTAS, QUOTA, name)
            status = (rq or {}).get("status", {})
            return bool(status.get("hard")) and "used" in status

        await eventually(counted, timeout=60, what=f"ResourceQuota of {name} counted")
        return name

    yield make
    for name in made:
        kubectl("delete", "project", name, "--wait=false", check=False)
    for name in made:
        await eventually(
            lambda n=name: _gone(kube, n), timeout=180, what=f"namespace {name} deleted"
        )


async def _gone(kube: Kube, name: str) -> bool:
    return await kube.get_raw(RESOURCEQUOTAS, QUOTA, name) is None and (
        await kube.get(Project, name) is None
    )


def instance(ns: str, name: str, flavor_name: str = "quota.c1") -> dict[str, Any]:
    # The image does not exist: the instance reserves, then waits for it.
    return {
        "apiVersion": COMPUTE,
        "kind": "Instance",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"flavor": flavor_name, "image": {"name": "none"}},
    }


def volume(ns: str, name: str, size: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": STORAGE,
        "kind": "Volume",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"sizeGib": size},
    }


def as_member(manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return apply(manifest, check=False, user=MEMBER)


async def fire(manifests: list[dict[str, Any]]) -> list[subprocess.CompletedProcess[str]]:
    """Create all at once, each by its own kubectl."""
    return list(await asyncio.gather(*(asyncio.to_thread(as_member, m) for m in manifests)))


async def ledger(kube: Kube, name: str) -> dict[str, Any]:
    project = await kube.get(Project, name)
    assert project is not None
    return dict(project.status.reservations)


async def usage(kube: Kube, name: str, field: str, summary: str) -> Project:
    async def probe() -> Project | None:
        project = await kube.get(Project, name)
        item = (
            getattr(project.status.usage, field, None) if project and project.status.usage else None
        )
        return project if item is not None and item.summary == summary else None

    found: Project = await eventually(probe, timeout=60, what=f"{name} {field} usage {summary}")
    return found


async def refused(kube: Kube, kind: type[Any], name: str, ns: str) -> str:
    async def probe() -> str | None:
        obj = await kube.get(kind, name, ns)
        cond = obj.status.condition("Stalled") if obj else None
        return cond.message if cond and cond.reason == "QuotaExceeded" else None

    message: str = await eventually(probe, timeout=60, what=f"{kind.crd.kind} {name} refused")
    return message


async def settled(
    kube: Kube, project: str, kind: type[Any], names: list[str], expect: tuple[int, int]
) -> None:
    """Wait until `expect` = (holding, refused) of the objects, once every one
    either holds a reservation or is Stalled with QuotaExceeded; an object
    that holds and is refused at once fails at once."""

    async def probe() -> tuple[int, int] | None:
        held = await ledger(kube, project)
        holding = refusing = 0
        for name in names:
            obj = await kube.get(kind, name, project)
            assert obj is not None
            cond = obj.status.condition("Stalled")
            is_refused = cond is not None and cond.reason == "QuotaExceeded"
            if obj.uid in held:
                holding += 1
                assert not is_refused, f"{name} holds quota and is refused"
            elif is_refused:
                refusing += 1
            else:
                return None
        return (holding, refusing) if (holding, refusing) == expect else None

    await eventually(probe, timeout=120, what=f"{expect} holding and refused")


# --- the tests ---------------------------------------------------------------------------


async def test_concurrent_instances_never_overshoot_cores(
    kube: Kube, project: ProjectFactory
) -> None:
    ns = await project(cores=3, instances=-1)
    names = [f"vm-{i}" for i in range(20)]
    results = await fire([instance(ns, n) for n in names])
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    await settled(kube, ns, Instance, names, (3, 17))
    held = await ledger(kube, ns)
    assert sum(r.cores for r in held.values()) == 3
    project_obj = await usage(kube, ns, "cores", "3/3")
    assert project_obj.status.usage is not None
    assert project_obj.status.usage.ram_mib is not None
    assert project_obj.status.usage.ram_mib.used == 3 * 256
    waiting = [n for n in names if (await kube.get(Instance, n, ns)).uid not in held]  # type: ignore[union-attr]
    assert await refused(kube, Instance, waiting[0], ns) == (
        "cores: 3 of 3 in use, this instance needs 1"
    )
    # Deleting one gives its core back: one refused instance gets it, no more.
    holder = next(n for n in names if n not in waiting)
    kubectl("delete", "instance", holder, "-n", ns, user=MEMBER)
    names.remove(holder)
    await settled(kube, ns, Instance, names, (3, 16))
    await usage(kube, ns, "instances", "19/unlimited")


async def test_concurrent_volumes_refused_at_admission(kube: Kube, project: ProjectFactory) -> None:
    ns = await project(volumes=2)
    results = await fire([volume(ns, f"v-{i}") for i in range(20)])
    created = [r for r in results if r.returncode == 0]
    refusals = [r.stderr for r in results if r.returncode != 0]
    assert len(created) == 2
    assert all(
        "exceeded quota: nubes-project-quotas" in e
        and "limited: count/volumes.storage.nubes.io=2" in e
        for e in refusals
    ), refusals
    listed = kubectl("get", "volumes", "-n", ns, "-o", "name", user=MEMBER).stdout.split()
    assert len(listed) == 2
    await usage(kube, ns, "volumes", "2/2")
    await usage(kube, ns, "gigabytes", "2/1000")


async def test_gigabytes_create_extend_delete(kube: Kube, project: ProjectFactory) -> None:
    ns = await project(gigabytes=5)
    assert as_member(volume(ns, "a", 3)).returncode == 0
    await usage(kube, ns, "gigabytes", "3/5")
    assert as_member(volume(ns, "b", 3)).returncode == 0
    assert await refused(kube, Volume, "b", ns) == ("gigabytes: 3 of 5 in use, this volume needs 3")
    assert (await kube.get(Volume, "b", ns)).uid not in await ledger(kube, ns)  # type: ignore[union-attr]
    # Extending counts the difference.
    assert as_member(volume(ns, "a", 5)).returncode == 0
    await usage(kube, ns, "gigabytes", "5/5")
    assert as_member(volume(ns, "a", 6)).returncode == 0
    assert await refused(kube, Volume, "a", ns) == (
        "gigabytes: 5 of 5 in use, this volume needs 1 more"
    )
    a = await kube.get(Volume, "a", ns)
    assert a is not None and a.status.granted_size_gib == 5  # the agent stops at the grant
    kubectl("delete", "volume", "a", "-n", ns, "--wait=false", user=MEMBER)
    # Its 5 GiB come back, and the refused volume b takes 3 of them.
    await usage(kube, ns, "gigabytes", "3/5")
    b = await kube.get(Volume, "b", ns)
    assert b is not None and b.uid in await ledger(kube, ns)


async def test_image_data_held_against_image_size_mib(
    kube: Kube, project: ProjectFactory, image_store: Path, tmp_path: Path
) -> None:
    ns = await project(imageSizeMib=3)
    data = tmp_path / "two-mib.raw"
    data.write_bytes(os.urandom(2 * 2**20))
    image(ns, "a", data, None, fmt="raw")
    await usage(kube, ns, "image_size_mib", "2/3")
    other = tmp_path / "two-mib-too.raw"
    other.write_bytes(os.urandom(2 * 2**20 - 1))  # rounded up to 2 MiB
    image(ns, "b", other, None, fmt="raw")
    assert await refused(kube, Image, "b", ns) == "imageSizeMib: 2 of 3 in use, this image needs 2"
    b = await kube.get(Image, "b", ns)
    assert b is not None and b.uid not in await ledger(kube, ns)
    assert not (image_store / b.uid).exists(), "the refused image's data stays in the store"
    # Deleting a gives its MiB back, and b is fetched again and takes them.
    kubectl("delete", "image", "a", "-n", ns)
    b = await eventually(lambda: _ready(kube, "b", ns), timeout=60, what="image b fetched again")
    assert b.uid in await ledger(kube, ns)
    await usage(kube, ns, "image_size_mib", "2/3")
    # A project whose image data fills its quota does not fetch at all.
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": ns},
            "spec": {
                "members": [{"name": MEMBER, "role": "member"}],
                "quotas": {"imageSizeMib": 2},
            },
        }
    )
    image(ns, "c", data, None, fmt="raw")
    assert await refused(kube, Image, "c", ns) == (
        "imageSizeMib: 2 of 2 in use, none left for this image"
    )


async def _ready(kube: Kube, name: str, ns: str) -> Image | None:
    found = await kube.get(Image, name, ns)
    return found if found is not None and found.status.is_true("Ready") else None


async def test_each_count_refused_at_its_limit(kube: Kube, project: ProjectFactory) -> None:
    limits = {
        "instances": 1,
        "volumes": 1,
        "snapshots": 1,
        "backups": 1,
        "ports": 1,
        "floatingIps": 1,
        "networks": 1,
        "subnets": 1,
        "routers": 1,
        # The project's `default` group holds one.
        "securityGroups": 2,
        "images": 1,
    }
    ns = await project(**limits)

    def obj(api: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": api,
            "kind": kind,
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }

    # Ports before subnets: a DHCP port would take the one port otherwise.
    snap = {"volume": "x"}
    unfetched = {"source": {"url": "http://127.0.0.1:9/none.img"}, "diskFormat": "raw"}
    on_net = {"network": {"name": "n-0"}}
    kinds: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
        ("instances.compute.nubes.io", lambda n: instance(ns, n)),
        ("volumes.storage.nubes.io", lambda n: volume(ns, n)),
        ("volumesnapshots.storage.nubes.io", lambda n: obj(STORAGE, "VolumeSnapshot", n, snap)),
        ("volumebackups.storage.nubes.io", lambda n: obj(STORAGE, "VolumeBackup", n, snap)),
        ("networks.network.nubes.io", lambda n: obj(NET, "Network", n, {})),
        ("ports.network.nubes.io", lambda n: obj(NET, "Port", n, on_net)),
        (
            "subnets.network.nubes.io",
            lambda n: obj(
                NET, "Subnet", n, {**on_net, "cidr": f"10.9.{n[-1]}.0/24", "enableDhcp": False}
            ),
        ),
        ("routers.network.nubes.io", lambda n: obj(NET, "Router", n, {})),
        (
            "floatingips.network.nubes.io",
            lambda n: obj(NET, "FloatingIP", n, {"floatingNetwork": {"name": "ext"}}),
        ),
        ("securitygroups.network.nubes.io", lambda n: obj(NET, "SecurityGroup", n, {})),
        ("images.image.nubes.io", lambda n: obj(IMAGE, "Image", n, unfetched)),
    ]
    for resource, make in kinds:
        prefix = resource.split(".")[0][0]
        first = as_member(make(f"{prefix}-0"))
        assert first.returncode == 0, (resource, first.stderr)
        second = as_member(make(f"{prefix}-1"))
        assert second.returncode != 0, resource
        assert "exceeded quota: nubes-project-quotas" in second.stderr, second.stderr
        limit = 2 if resource.startswith("securitygroups.") else 1
        assert f"limited: count/{resource}={limit}" in second.stderr, second.stderr
    project_obj = await usage(kube, ns, "security_groups", "2/2")
    assert project_obj.status.usage is not None
    assert project_obj.status.usage.networks is not None
    assert project_obj.status.usage.networks.summary == "1/1"
    # Members cannot touch the quota that enforces this.
    denied = kubectl(
        "patch", "resourcequota", QUOTA, "-n", ns, "--type=merge",
        "-p", '{"spec":{"hard":{"count/volumes.storage.nubes.io":"100"}}}',
        check=False, user=MEMBER,
    )  # fmt: skip
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    denied = kubectl("delete", "resourcequota", QUOTA, "-n", ns, check=False, user=MEMBER)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


async def test_lowering_a_quota_keeps_what_exists(kube: Kube, project: ProjectFactory) -> None:
    ns = await project(cores=4, ramMib=1024, volumes=3)
    for n in ("vm-0", "vm-1"):
        assert as_member(instance(ns, n, "quota.c2")).returncode == 0
    for n in ("v-0", "v-1"):
        assert as_member(volume(ns, n)).returncode == 0
    await usage(kube, ns, "cores", "4/4")
    await usage(kube, ns, "volumes", "2/3")
    kubectl(
        "patch", "project", ns, "--type=merge",
        "-p", '{"spec":{"quotas":{"cores":1,"volumes":1}}}',
    )  # fmt: skip
    await usage(kube, ns, "cores", "4/1")
    await usage(kube, ns, "volumes", "2/1")
    # Nothing that exists is touched ...
    held = await ledger(kube, ns)
    for n in ("vm-0", "vm-1"):
        inst = await kube.get(Instance, n, ns)
        assert inst is not None and inst.uid in held
        assert not inst.status.is_true("Stalled") or (
            inst.status.condition("Stalled").reason != "QuotaExceeded"  # type: ignore[union-attr]
        )
    # ... and nothing new gets in.
    assert as_member(instance(ns, "vm-2")).returncode == 0
    assert await refused(kube, Instance, "vm-2", ns) == (
        "cores: 4 of 1 in use, this instance needs 1"
    )

    async def admitted_quota_lowered() -> bool:
        rq = await kube.get_raw(RESOURCEQUOTAS, QUOTA, ns)
        return (rq or {}).get("status", {}).get("hard", {}).get(
            "count/volumes.storage.nubes.io"
        ) == "1"

    await eventually(admitted_quota_lowered, timeout=30, what="ResourceQuota lowered")
    third = as_member(volume(ns, "v-2"))
    assert third.returncode != 0 and "exceeded quota: nubes-project-quotas" in third.stderr
    assert len(kubectl("get", "volumes", "-n", ns, "-o", "name").stdout.split()) == 2


async def test_kubectl_shows_usage_columns(kube: Kube, project: ProjectFactory) -> None:
    ns = await project(instances=5, cores=8, ramMib=2048, volumes=4, gigabytes=20)
    assert as_member(instance(ns, "vm", "quota.c2")).returncode == 0
    assert as_member(volume(ns, "v", 3)).returncode == 0
    await usage(kube, ns, "gigabytes", "3/20")
    await usage(kube, ns, "cores", "2/8")
    out = kubectl("get", "project", ns, user=MEMBER).stdout
    header, row = out.splitlines()[:2]
    for column in ("INSTANCES", "CORES", "RAM-MIB", "VOLUMES", "GIB"):
        assert column in header
    assert row.split()[3:8] == ["1/5", "2/8", "512/2048", "1/4", "3/20"]
