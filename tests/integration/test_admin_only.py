"""What only a cloud administrator may set (issue 8.4), checked as real users
against the real API server: a project member (impersonated) is refused with
a message naming the field, and a user bound by a ClusterRoleBinding to the
real `nubes:cloud-admin` ClusterRole is allowed. Never the cluster admin:
system:masters passes every authorizer check and proves nothing.

Port binding hosts, migration target nodes, provider network attributes (on
create and on update), and non-public flavors and volume types with their
per-project access lists (the controller refuses what a project may not use).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from nubes.api.compute import Instance
from nubes.api.identity import Project
from nubes.api.storage import Volume
from nubes.runtime.kube import Kube
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import COMPUTE, NET, condition

STORAGE = "storage.nubes.io/v1alpha1"
REFUSED = "only a cloud administrator (ClusterRole nubes:cloud-admin)"


@pytest.fixture
async def project(kube: Kube, controller: Process) -> AsyncIterator[str]:
    """A project (namespace of the same name) where bob is a member."""
    name = f"adm-{uuid.uuid4().hex[:6]}"
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": name},
            "spec": {"members": [{"name": "bob", "role": "member"}]},
        }
    )
    await condition(kube, Project, name, None)
    yield name
    kubectl("delete", "project", name, "--wait=false", check=False)


@pytest.fixture
async def cloud_admin() -> AsyncIterator[str]:
    """A user bound to the chart's nubes:cloud-admin ClusterRole, only here."""
    user = f"carol-{uuid.uuid4().hex[:6]}"
    binding = f"test-cloud-admin-{user}"
    kubectl(
        "create", "clusterrolebinding", binding, "--clusterrole=nubes:cloud-admin", f"--user={user}"
    )

    def bound() -> bool:
        can = kubectl("auth", "can-i", "create", "flavors.compute.nubes.io", check=False, user=user)
        return can.stdout.strip() == "yes"

    await eventually(bound, what=f"{user} bound to nubes:cloud-admin")
    yield user
    kubectl("delete", "clusterrolebinding", binding, check=False)


@pytest.fixture
def cleanup() -> Iterator[list[tuple[str, str]]]:
    """Cluster-scoped objects a test made: (kind, name), deleted afterwards."""
    made: list[tuple[str, str]] = []
    yield made
    for kind, name in made:
        kubectl("delete", kind, name, "--ignore-not-found", check=False)


def as_user(user: str, manifest: dict[str, Any]) -> tuple[int, str]:
    result = apply(manifest, check=False, user=user)
    return result.returncode, result.stderr


def allowed(user: str, manifest: dict[str, Any]) -> None:
    rc, err = as_user(user, manifest)
    assert rc == 0, f"{user} creating {manifest['kind']} {manifest['metadata']['name']}: {err}"


def obj(api: str, kind: str, name: str, ns: str | None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


def merge_patch(user: str, kind: str, name: str, patch: dict[str, Any]) -> None:
    kubectl("patch", kind, name, "--type=merge", "-p", json.dumps(patch), user=user)


async def reason(kube: Kube, kind: type[Any], name: str, ns: str, want: str) -> Any:
    """The object once its Stalled condition is true with reason `want`."""

    async def probe() -> Any:
        got = await kube.get(kind, name, ns)
        cond = got.status.condition("Stalled") if got is not None else None
        return got if cond is not None and cond.status == "True" and cond.reason == want else None

    return await eventually(probe, timeout=60, what=f"{kind.crd.kind} {ns}/{name} {want}")


def stalled_message(got: Any) -> str:
    cond = got.status.condition("Stalled")
    return str(cond.message if cond else "")


async def test_port_binding_host_is_for_cloud_admins(project: str, cloud_admin: str) -> None:
    ns = project
    allowed("bob", obj(NET, "Network", "net", ns))
    bound = obj(NET, "Port", "p", ns, network={"name": "net"}, binding={"host": "nowhere"})
    rc, err = as_user("bob", bound)
    assert rc != 0 and f"spec.binding.host: {REFUSED} may bind a port to a node" in err
    allowed(cloud_admin, bound)
    # The same value again (GitOps re-apply) and other fields stay the member's.
    allowed("bob", bound)
    allowed("bob", {**bound, "spec": {**bound["spec"], "description": "web"}})
    for spec in (
        {"network": {"name": "net"}, "binding": {"host": "elsewhere"}},  # moved
        {"network": {"name": "net"}, "description": "web"},  # unbound
    ):
        rc, err = as_user("bob", {**bound, "spec": spec})
        assert rc != 0 and "spec.binding.host" in err and REFUSED in err, spec
    # Unbound ports (the instance decides where they go) are the member's.
    allowed("bob", obj(NET, "Port", "free", ns, network={"name": "net"}))


async def test_migration_target_node_is_for_cloud_admins(project: str, cloud_admin: str) -> None:
    ns = project
    targeted = obj(
        COMPUTE, "InstanceAction", "move", ns, instance="vm", action="Migrate", targetNode="n2"
    )
    rc, err = as_user("bob", targeted)
    assert rc != 0 and f"spec.targetNode: {REFUSED} may choose the node of a migration" in err
    allowed(cloud_admin, targeted)
    assert as_user("bob", targeted)[0] == 0  # re-applied unchanged
    plain = obj(COMPUTE, "InstanceAction", "move2", ns, instance="vm", action="Migrate")
    allowed("bob", plain)


async def test_provider_attributes_need_a_cloud_admin_on_create_and_update(
    project: str, cloud_admin: str
) -> None:
    ns = project
    for name, spec, fields in (
        (
            "vlan",
            {"type": "vlan", "physicalNetwork": "physnet1"},
            "spec.type, spec.physicalNetwork",
        ),
        (
            "flat",
            {"type": "flat", "physicalNetwork": "physnet1"},
            "spec.type, spec.physicalNetwork",
        ),
        ("vni", {"segmentationId": 100000 + uuid.uuid4().int % 100000}, "spec.segmentationId"),
        ("shared", {"shared": True}, "spec.shared"),
        ("external", {"external": True}, "spec.external"),
    ):
        rc, err = as_user("bob", obj(NET, "Network", name, ns, **spec))
        assert rc != 0, name
        assert f"{fields}: provider network attributes" in err, err
        assert "need a cloud administrator (ClusterRole nubes:cloud-admin)" in err
        allowed(cloud_admin, obj(NET, "Network", name, ns, **spec))

    # Update: the member's own network cannot become shared or external...
    allowed("bob", obj(NET, "Network", "own", ns))
    for change in ({"shared": True}, {"external": True}):
        rc, err = as_user("bob", obj(NET, "Network", "own", ns, **change))
        assert rc != 0 and "provider network attributes" in err, change
    # ... and what the cloud admin set stays set: re-applying it, or changing
    # other fields, is allowed; turning it off is not.
    allowed(cloud_admin, obj(NET, "Network", "own", ns, shared=True))
    allowed("bob", obj(NET, "Network", "own", ns, shared=True, description="x"))
    rc, err = as_user("bob", obj(NET, "Network", "own", ns, description="x"))
    assert rc != 0 and "spec.shared: provider network attributes" in err


async def test_shared_network_attributes_are_the_network_owners(
    project: str, cloud_admin: str
) -> None:
    """On another project's shared network a member (bob) takes no address
    of the owner's hosts and does not opt out of port security: what
    Neutron's network-owner rules keep for the owner and admins."""
    ns, owner = project, f"{project}-owner"
    kubectl("create", "namespace", owner)
    try:
        allowed(cloud_admin, obj(NET, "Network", "shared", owner, shared=True))
        net = {"name": "shared", "namespace": owner}
        allowed("bob", obj(NET, "Port", "plain", ns, network=net, fixedIps=[{"subnet": "s"}]))
        for field, spec in (
            ("spec.macAddress", {"macAddress": "fa:16:3e:00:00:01"}),
            ("spec.fixedIps", {"fixedIps": [{"ipAddress": "10.9.0.1"}]}),
            ("spec.allowedAddressPairs", {"allowedAddressPairs": [{"ipAddress": "0.0.0.0/0"}]}),
            ("spec.portSecurityEnabled", {"portSecurityEnabled": False}),
            ("spec.deviceOwner", {"deviceOwner": "network:dhcp"}),
        ):
            hostile = obj(NET, "Port", "p", ns, network=net, **spec)
            rc, err = as_user("bob", hostile)
            assert rc != 0 and f"{field}: " in err, (field, err)
            assert f"network {owner}/shared" in err and "only its project or a cloud" in err
            # A cloud administrator may; re-applying what is there stays the member's.
            allowed(cloud_admin, hostile)
            allowed("bob", hostile)
            kubectl("delete", "port", "p", "-n", ns, "--wait=false")
        # On the member's own network all of it is the member's.
        allowed("bob", obj(NET, "Network", "own", ns))
        own = {"macAddress": "fa:16:3e:00:00:02", "portSecurityEnabled": False}
        allowed("bob", obj(NET, "Port", "mine", ns, network={"name": "own"}, **own))
        # An instance's NIC on the shared network becomes such a port.
        nic = {"network": net, "fixedIp": "10.9.0.1"}
        vm = obj(COMPUTE, "Instance", "vm", ns, flavor="f", image={"name": "i"}, networks=[nic])
        rc, err = as_user("bob", vm)
        assert rc != 0 and "spec.networks[].fixedIp: on another project's network" in err, err
        allowed("bob", {**vm, "spec": {**vm["spec"], "networks": [{"network": net}]}})
    finally:
        kubectl("delete", "namespace", owner, "--wait=false", check=False)


async def test_non_public_flavor_needs_the_project_on_its_access_list(
    kube: Kube, project: str, cloud_admin: str, cleanup: list[tuple[str, str]]
) -> None:
    ns = project
    name = f"private-{uuid.uuid4().hex[:6]}"
    flavor = obj(COMPUTE, "Flavor", name, None, vcpus=1, ramMib=256, diskGib=1, isPublic=False)
    cleanup.append(("flavor", name))
    allowed(cloud_admin, flavor)
    # The access list is the operator's: members cannot grant themselves.
    denied = kubectl(
        "patch",
        "flavor",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"projects": [ns]}}),
        check=False,
        user="bob",
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    allowed("bob", obj(NET, "Network", "net", ns))
    vm = obj(
        COMPUTE,
        "Instance",
        "vm",
        ns,
        flavor=name,
        image={"name": "img"},
        networks=[{"network": {"name": "net"}}],
    )
    allowed("bob", vm)
    got = await reason(kube, Instance, "vm", ns, "FlavorNotAccessible")
    assert stalled_message(got) == (
        f"flavor {name} is not public and project {ns} is not on its access list;"
        " a cloud administrator can add the project to its spec.projects"
    )
    assert got.status.node is None
    ports = kubectl("get", "ports", "-n", ns, "-o", "name").stdout.split()
    assert ports == [], "a refused instance creates nothing"

    merge_patch(cloud_admin, "flavor", name, {"spec": {"projects": ["someone-else", ns]}})
    # Access granted: the instance goes on to its next check (its image).
    await reason(kube, Instance, "vm", ns, "ImageNotFound")

    # Flavors stay immutable apart from their access list.
    resized = kubectl(
        "patch",
        "flavor",
        name,
        "--type=merge",
        "-p",
        '{"spec": {"vcpus": 2}}',
        check=False,
        user=cloud_admin,
    )
    assert resized.returncode != 0
    assert "a flavor is immutable except its projects access list" in resized.stderr
    public = obj(COMPUTE, "Flavor", f"{name}-pub", None, vcpus=1, ramMib=256, projects=[ns])
    rc, err = as_user(cloud_admin, public)
    assert rc != 0 and "projects is the access list of a non-public flavor" in err


async def test_non_public_volume_type_needs_the_project_on_its_access_list(
    kube: Kube, project: str, cloud_admin: str, cleanup: list[tuple[str, str]]
) -> None:
    ns = project
    name = f"private-{uuid.uuid4().hex[:6]}"
    # A backend no node serves: once access is granted the volume stops at
    # scheduling (NoValidBackend) and is never placed on a node.
    vtype = obj(STORAGE, "VolumeType", name, None, backendName=f"{name}-none", isPublic=False)
    cleanup.append(("volumetype", name))
    allowed(cloud_admin, vtype)
    denied = kubectl(
        "patch",
        "volumetype",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"projects": [ns]}}),
        check=False,
        user="bob",
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    allowed("bob", obj(STORAGE, "Volume", "data", ns, sizeGib=1, volumeType=name))
    got = await reason(kube, Volume, "data", ns, "VolumeTypeNotAccessible")
    assert stalled_message(got) == (
        f"volume type {name} is not public and project {ns} is not on its access list;"
        " a cloud administrator can add the project to its spec.projects"
    )
    assert got.status.node is None

    merge_patch(cloud_admin, "volumetype", name, {"spec": {"projects": [ns]}})
    placed = await reason(kube, Volume, "data", ns, "NoValidBackend")
    assert stalled_message(placed).startswith("no pool can hold volume data")
    assert placed.status.node is None
