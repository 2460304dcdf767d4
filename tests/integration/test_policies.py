"""What the admission policies reserve, checked as real users (impersonated)
against the real API server: instance locks, protected images, provider
networks and public images."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from nubes.api.identity import Project
from nubes.runtime.kube import Kube
from tests.helpers import Process, apply, kubectl
from tests.integration.cloud import COMPUTE, IMAGE, NET, condition

INSTANCE = {"flavor": "m1.tiny", "image": {"name": "img"}}


@pytest.fixture
async def project(kube: Kube, controller: Process) -> AsyncIterator[str]:
    name = f"pol-{uuid.uuid4().hex[:6]}"
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": name},
            "spec": {
                "members": [{"name": "alice", "role": "admin"}, {"name": "bob", "role": "member"}]
            },
        }
    )
    await condition(kube, Project, name, None)
    yield name
    kubectl("delete", "project", name, "--wait=false", check=False)


def as_user(user: str, manifest: dict[str, object]) -> tuple[int, str]:
    result = apply(manifest, check=False, user=user)
    return result.returncode, result.stderr


def instance(ns: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": COMPUTE,
        "kind": "Instance",
        "metadata": {"name": "vm", "namespace": ns},
        "spec": {**INSTANCE, **spec},
    }


async def test_locked_instances_refuse_members_but_not_admins(project: str) -> None:
    ns = project
    assert as_user("bob", instance(ns))[0] == 0
    assert as_user("bob", instance(ns, locked=True, lockReason="maintenance"))[0] == 0
    rc, err = as_user(
        "bob", instance(ns, locked=True, lockReason="maintenance", powerState="Stopped")
    )
    assert rc != 0
    assert "instance vm is locked (maintenance): only an admin may change it" in err
    denied = kubectl("delete", "instance", "vm", "-n", ns, "--wait=false", check=False, user="bob")
    assert denied.returncode != 0 and "only an admin may delete it" in denied.stderr
    # Labels are not changes; unlocking is allowed to anyone.
    assert kubectl("label", "instance", "vm", "-n", ns, "team=web", user="bob").returncode == 0
    # A project admin may change a locked instance.
    assert (
        as_user("alice", instance(ns, locked=True, lockReason="maintenance", powerState="Stopped"))[
            0
        ]
        == 0
    )
    assert as_user("bob", instance(ns, locked=False, powerState="Stopped"))[0] == 0
    assert as_user("bob", instance(ns, powerState="Running"))[0] == 0
    assert kubectl("delete", "instance", "vm", "-n", ns, "--wait=false", user="bob").returncode == 0


async def test_an_admins_lock_is_lifted_by_admins_only(project: str) -> None:
    ns = project
    admin_lock = instance(ns, locked=True, lockedBy="admin", lockReason="audit")
    assert as_user("bob", instance(ns))[0] == 0
    rc, err = as_user("bob", admin_lock)
    assert rc != 0 and "spec.lockedBy: admin is an administrator's lock" in err, err
    assert as_user("alice", admin_lock)[0] == 0
    # Re-applied unchanged (GitOps) it stays; lifting or weakening it is refused.
    assert as_user("bob", admin_lock)[0] == 0
    for attempt in (
        instance(ns, locked=False),
        instance(ns, locked=True, lockedBy="owner", lockReason="audit"),
    ):
        rc, err = as_user("bob", attempt)
        assert rc != 0 and "instance vm is locked (audit): only an admin may change it" in err
        assert "or unlock it (lockedBy: admin)" in err
    denied = kubectl("delete", "instance", "vm", "-n", ns, "--wait=false", check=False, user="bob")
    assert denied.returncode != 0 and "only an admin may delete it" in denied.stderr
    assert as_user("alice", instance(ns, locked=False))[0] == 0
    assert kubectl("delete", "instance", "vm", "-n", ns, "--wait=false", user="bob").returncode == 0


async def test_protected_images_cannot_be_deleted(project: str) -> None:
    ns = project
    image = {
        "apiVersion": IMAGE,
        "kind": "Image",
        "metadata": {"name": "img", "namespace": ns},
        "spec": {
            "source": {"url": "http://127.0.0.1:9/none.img"},
            "diskFormat": "raw",
            "protected": True,
        },
    }
    assert as_user("bob", image)[0] == 0
    denied = kubectl("delete", "image", "img", "-n", ns, "--wait=false", check=False)
    assert denied.returncode != 0
    assert "image img is protected: set spec.protected to false before deleting it" in denied.stderr
    image["spec"]["protected"] = False  # type: ignore[index]
    assert as_user("bob", image)[0] == 0
    assert kubectl("delete", "image", "img", "-n", ns, "--wait=false", user="bob").returncode == 0


async def test_provider_networks_and_public_images_need_a_cloud_admin(project: str) -> None:
    ns = project

    def net(name: str, **spec: object) -> dict[str, object]:
        return {
            "apiVersion": NET,
            "kind": "Network",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }

    assert as_user("bob", net("tenant", type="vxlan"))[0] == 0
    for name, spec in (
        ("vlan", {"type": "vlan", "physicalNetwork": "physnet1"}),
        ("chosen-vni", {"type": "vxlan", "segmentationId": 4242}),
        ("shared", {"shared": True}),
        ("external", {"external": True}),
    ):
        rc, err = as_user("alice", net(name, **spec))
        assert rc != 0, name
        assert "provider network attributes" in err and "need a cloud administrator" in err
    # The cluster admin (kubectl's own identity) is a cloud admin.
    assert apply(net("vlan", type="vlan", physicalNetwork="physnet1")).returncode == 0

    public = {
        "apiVersion": IMAGE,
        "kind": "Image",
        "metadata": {"name": "pub", "namespace": ns},
        "spec": {
            "source": {"url": "http://127.0.0.1:9/x"},
            "diskFormat": "raw",
            "visibility": "public",
        },
    }
    rc, err = as_user("bob", public)
    assert rc != 0 and "only a cloud administrator may make an image public" in err
    assert apply(public).returncode == 0
