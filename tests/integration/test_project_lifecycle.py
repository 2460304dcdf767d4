"""A project's lifecycle (issue 11, point 3): disabling it takes its members'
access away at once and re-enabling gives it back, resources untouched;
deleting it deletes everything in it and leaves nothing on any node.

Members are impersonated (`kubectl --as`) and bound only through the
project's RoleBindings, so the API server's own authorizer decides.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Hypervisor
from nubes.api.identity import Project
from nubes.api.network import Allocation, Network, Port, Subnet
from nubes.api.storage import Volume, VolumeSnapshot
from nubes.runtime.kube import NAMESPACES, Kube, path_of
from tests.drivers.storage_helpers import tgtd_running
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import condition, network, node_name, port, start_agent, subnet
from tests.integration.conftest import get_condition
from tests.integration.test_storage import StorageNode, snapshot, start_storage_agent, volume
from tests.nodes import Fabric, sh

MEMBER = "bob"
ADMIN = "alice"
READER = "carol"


def project_manifest(name: str, enabled: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "identity.nubes.io/v1alpha1",
        "kind": "Project",
        "metadata": {"name": name},
        "spec": {
            "enabled": enabled,
            "members": [
                {"name": MEMBER, "role": "member"},
                {"name": READER, "role": "reader"},
            ],
        },
    }


async def ready_reason(kube: Kube, name: str) -> str | None:
    cond = await get_condition(kube, path_of(Project), name, None)
    return str(cond["reason"]) if cond and cond["status"] == "True" else None


# A project is Ready once the quota controller (kube-controller-manager) has
# counted its namespace. In a control plane started moments before the CRDs
# were installed, its first count of custom resources can wait for a resync
# (minutes); the API server refuses counted creations until then.
@pytest.fixture
async def project(kube: Kube, controller: Process) -> AsyncIterator[str]:
    name = f"lc-{uuid.uuid4().hex[:6]}"
    apply(project_manifest(name))
    await eventually(lambda: ready_reason(kube, name), timeout=360, what="project Ready")
    yield name
    kubectl("delete", "project", name, "--wait=false", "--ignore-not-found")


def net_manifest(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "network.nubes.io/v1alpha1",
        "kind": "Network",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"description": "the member's"},
    }


def can_list(user: str, ns: str) -> bool:
    got = kubectl("get", "networks", "-n", ns, user=user, check=False)
    if got.returncode != 0:
        assert "forbidden" in got.stderr, got.stderr
    return got.returncode == 0


def set_enabled(name: str, enabled: bool) -> None:
    patch = json.dumps({"spec": {"enabled": enabled}})
    kubectl("patch", "project", name, "--type=merge", "-p", patch)


async def test_disabling_takes_access_away_and_enabling_gives_it_back(
    kube: Kube, project: str
) -> None:
    ns = project
    assert apply(net_manifest(ns, "kept"), user=MEMBER).returncode == 0
    assert can_list(MEMBER, ns) and can_list(READER, ns)
    before = await kube.get(Network, "kept", ns)
    assert before is not None

    set_enabled(project, False)
    # RBAC reads bindings from the API server's watch cache: seconds at most.
    await eventually(lambda: not can_list(MEMBER, ns), timeout=10, what="member refused")
    assert not can_list(READER, ns)
    refused = apply(net_manifest(ns, "more"), user=MEMBER, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr
    deleting = kubectl("delete", "network", "kept", "-n", ns, user=MEMBER, check=False)
    assert deleting.returncode != 0 and "forbidden" in deleting.stderr
    # Disabled is a state reached, not a failure: Ready, reason Disabled.
    await eventually(lambda: _is(ready_reason(kube, project), "Disabled"), what="reason Disabled")
    cond = await get_condition(kube, path_of(Project), project, None)
    assert cond is not None and "disabled" in cond["message"]

    set_enabled(project, True)
    await eventually(lambda: can_list(MEMBER, ns), timeout=10, what="member allowed again")
    assert can_list(READER, ns)
    await eventually(lambda: _is(ready_reason(kube, project), "Ready"), what="reason Ready")
    after = await kube.get(Network, "kept", ns)
    assert after is not None
    assert (after.uid, after.metadata.generation, after.spec) == (
        before.uid,
        before.metadata.generation,
        before.spec,
    )
    assert not after.deleting
    assert apply(net_manifest(ns, "more"), user=MEMBER).returncode == 0


async def test_disabling_also_suspends_bindings_project_admins_made(
    kube: Kube, project: str
) -> None:
    """Members a project admin added and application credentials are
    RoleBindings to the project roles outside the Project's spec: they are
    suspended with the project and come back with it."""
    ns, added = project, "dave"
    apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "added-by-admin", "namespace": ns},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "nubes:project-reader",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": added}],
        }
    )
    await eventually(lambda: can_list(added, ns), timeout=10, what="added reader allowed")
    set_enabled(project, False)
    await eventually(lambda: not can_list(added, ns), timeout=15, what="added reader refused")
    set_enabled(project, True)
    await eventually(lambda: can_list(added, ns), timeout=15, what="added reader allowed again")


def binding(ns: str, name: str, role: str, user: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns, **meta},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role,
        },
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


@pytest.fixture
async def with_admin(kube: Kube, controller: Process) -> AsyncIterator[dict[str, Any]]:
    """A Ready project whose members include ADMIN, a project admin: its manifest."""
    manifest = project_manifest(f"lc-{uuid.uuid4().hex[:6]}")
    manifest["spec"]["members"].append({"name": ADMIN, "role": "admin"})
    ns = manifest["metadata"]["name"]
    apply(manifest)
    try:
        await eventually(lambda: ready_reason(kube, ns), timeout=360, what="project Ready")
        yield manifest
    finally:
        kubectl("delete", "project", ns, "--wait=false", "--ignore-not-found")


async def test_a_project_admin_keeps_no_access_through_the_controllers_bindings(
    with_admin: dict[str, Any],
) -> None:
    """A project admin may bind the project roles, but not under the names
    of the controller's own bindings (spared when the project is disabled),
    nor with the annotation that holds a disabled project's subjects."""
    ns, admin = with_admin["metadata"]["name"], ADMIN
    # Deleted, the controller makes it again at once; made by her, it is refused
    # (admission runs before the store would find the name taken).
    kubectl("delete", "rolebinding", "nubes-project-reader", "-n", ns, user=admin)
    taken = kubectl(
        "create", "-f", "-", user=admin, check=False,
        input=json.dumps(binding(ns, "nubes-project-reader", "nubes:project-admin", admin)),
    )  # fmt: skip
    assert taken.returncode != 0 and "the name is the Nubes controller's" in taken.stderr
    held = json.dumps([{"kind": "User", "name": admin}])
    annotated = binding(
        ns, "held", "nubes:project-reader", READER,
        annotations={"nubes.io/suspended-subjects": held},
    )  # fmt: skip
    refused = apply(annotated, user=admin, check=False)
    assert refused.returncode != 0 and "suspended-subjects" in refused.stderr
    # Under the controller's prefix, a binding of hers is suspended like any other.
    keep = binding(ns, "nubes-project-keep", "nubes:project-admin", admin)
    assert apply(keep, user=admin).returncode == 0
    set_enabled(ns, False)
    await eventually(lambda: not can_list(admin, ns), timeout=15, what="admin refused")
    assert not can_list(MEMBER, ns)
    # Enabled again: the controller's reader binding is back.
    set_enabled(ns, True)
    await eventually(lambda: can_list(READER, ns), timeout=15, what="reader allowed again")
    assert can_list(admin, ns)


def credential(ns: str, name: str, role: str, creator: str) -> dict[str, Any]:
    """An application credential's ServiceAccount as `nubes app-credential
    create` makes it."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"nubes.io/app-credential": "true", "nubes.io/role": role},
            "annotations": {"nubes.io/lifetime-seconds": "3600", "nubes.io/created-by": creator},
        },
    }


def subjects_of(ns: str, name: str) -> list[Any]:
    got = kubectl("get", "rolebinding", name, "-n", ns, "-o", "json")
    return list(json.loads(got.stdout).get("subjects") or [])


async def test_an_admin_who_loses_the_role_keeps_nothing_they_granted(
    with_admin: dict[str, Any],
) -> None:
    """Keystone ends a user's application credentials with their role: an
    admin removed from spec.members keeps no access through a binding they
    made for themselves or a credential they made."""
    manifest = with_admin
    ns, admin = manifest["metadata"]["name"], ADMIN
    # In a project a ServiceAccount is an application credential, made by its creator.
    plain = credential(ns, "bot", "admin", admin)
    del plain["metadata"]["labels"], plain["metadata"]["annotations"]
    refused = apply(plain, user=admin, check=False)
    assert refused.returncode != 0 and "is an application credential" in refused.stderr
    forged = apply(credential(ns, "forged", "admin", MEMBER), user=admin, check=False)
    assert forged.returncode != 0 and "nubes.io/created-by=alice" in forged.stderr
    assert apply(credential(ns, "ci", "admin", admin), user=admin).returncode == 0
    ci = {"kind": "ServiceAccount", "name": "ci", "namespace": ns}
    default = {"kind": "ServiceAccount", "name": "default", "namespace": ns}
    mine = binding(ns, "mine", "nubes:project-admin", admin)
    mine["subjects"] += [ci, default]
    assert apply(mine, user=admin).returncode == 0
    # Only credentials among the project's ServiceAccounts stay bound.
    await eventually(
        lambda: default not in subjects_of(ns, "mine"), timeout=15, what="default unbound"
    )
    assert ci in subjects_of(ns, "mine")

    # The cloud admin takes her admin role.
    manifest["spec"]["members"] = manifest["spec"]["members"][:-1]
    apply(manifest)
    await eventually(lambda: not can_list(admin, ns), timeout=15, what="removed admin refused")
    await eventually(
        lambda: kubectl("get", "sa", "ci", "-n", ns, check=False).returncode != 0,
        timeout=15,
        what="her credential ended",
    )
    assert subjects_of(ns, "mine") == []
    assert can_list(MEMBER, ns) and can_list(READER, ns)


async def test_project_created_disabled_grants_nothing(kube: Kube, controller: Process) -> None:
    name = f"lc-{uuid.uuid4().hex[:6]}"
    apply(project_manifest(name, enabled=False))
    try:
        await eventually(
            lambda: _is(ready_reason(kube, name), "Disabled"), timeout=90, what="Disabled"
        )
        assert not can_list(MEMBER, name)
        set_enabled(name, True)
        await eventually(lambda: can_list(MEMBER, name), timeout=10, what="member allowed")
    finally:
        kubectl("delete", "project", name, "--wait=false", "--ignore-not-found")


async def _is(reason: Any, wanted: str) -> bool:
    return bool(await reason == wanted)


# --- deletion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["n1"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def net_agent(fabric: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_agent(fabric, fabric.nodes[0], tmp_path_factory)
    yield proc
    proc.stop()
    kubectl("delete", "hypervisor", node_name(fabric, fabric.nodes[0]), "--ignore-not-found")
    proc.assert_no_crash()


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, image_store: Path) -> Iterator[StorageNode]:
    if not tgtd_running():
        pytest.skip("tgtd is not running")
    name = f"stor-{uuid.uuid4().hex[:6]}"
    root = tmp_path_factory.mktemp("storage-node")
    node = StorageNode(name, root, start_storage_agent(tmp_path_factory, name, root, image_store))
    yield node
    node.proc.stop()
    kubectl("delete", "hypervisor", name, "--ignore-not-found")
    node.proc.assert_no_crash()


def dnsmasq_pids(fabric: Fabric) -> list[str]:
    return sh("pgrep", "-f", f"dnsmasq.*{fabric.root}", check=False).stdout.split()


async def test_deleting_a_project_leaves_nothing(
    kube: Kube,
    controller: Process,
    fabric: Fabric,
    net_agent: Process,
    storage: StorageNode,
) -> None:
    name = f"lc-{uuid.uuid4().hex[:6]}"
    apply(project_manifest(name))
    await eventually(lambda: ready_reason(kube, name), timeout=360, what="project Ready")
    ns = name
    host = node_name(fabric, fabric.nodes[0])
    await eventually(lambda: _hv_ready(kube, host), timeout=60, what=f"hypervisor {host}")
    network(ns, "net", fabric)
    subnet(ns, "sub", "net", "10.77.0.0/24")
    port(ns, "bound", "net", host=host)
    port(ns, "spare", "net")
    volume(ns, "vol", 1, storage.zone)
    await condition(kube, Subnet, "sub", ns)
    await condition(kube, Port, "spare", ns)
    # A bound port is Ready once a guest is plugged; its address is enough here.
    await eventually(lambda: _has_address(kube, "bound", ns), what="bound port addressed")
    vol = await condition(kube, Volume, "vol", ns, timeout=90)
    # A snapshot makes deletion order matter: the volume waits for it.
    snapshot(ns, "snap", "vol")
    await condition(kube, VolumeSnapshot, "snap", ns, timeout=90)
    # What deletion must take away is there to begin with.
    await eventually(lambda: dnsmasq_pids(fabric), timeout=60, what="dnsmasq running")
    assert [n for n in fabric.namespaces() if "-dhcp-" in n]
    assert await _allocations_of(kube, ns)
    assert storage.volume_file(vol).exists() and storage.leftovers()

    kubectl("delete", "project", name)

    async def namespace_gone() -> bool:
        return await kube.get_raw(NAMESPACES, ns) is None

    await eventually(namespace_gone, timeout=120, what=f"namespace {ns} deleted")
    await eventually(lambda: _no_allocations(kube, ns), timeout=30, what="allocations released")
    await eventually(lambda: not dnsmasq_pids(fabric), timeout=30, what="dnsmasq stopped")
    await eventually(
        lambda: not [n for n in fabric.namespaces() if "-dhcp-" in n],
        timeout=30,
        what="DHCP namespace removed",
    )
    switch_ports = fabric.nodes[0].vsctl("list-ports", "br-int").split()
    assert not [p for p in switch_ports if p.startswith(("dh", "vg", "qvo"))], switch_ports
    await eventually(lambda: not storage.leftovers(), timeout=30, what="volume files removed")


async def _hv_ready(kube: Kube, name: str) -> bool:
    hv = await kube.get(Hypervisor, name)
    return hv is not None and hv.status.is_true("Ready")


async def _has_address(kube: Kube, name: str, ns: str) -> bool:
    p = await kube.get(Port, name, ns)
    return p is not None and bool(p.status.fixed_ips)


async def _allocations_of(kube: Kube, ns: str) -> list[Allocation]:
    return [a for a in await kube.list(Allocation) if a.spec.owner.namespace == ns]


async def _no_allocations(kube: Kube, ns: str) -> bool:
    return not await _allocations_of(kube, ns)
