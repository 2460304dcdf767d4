"""The policy table (charts/nubes/files/policy.yaml) cell by cell against the
real API server: for every kind, verb and role, impersonated users get the
answer the table gives. The users are a project admin, member and reader of
project A, a project admin of project B, and a user bound to the chart's
nubes:cloud-admin by a ClusterRoleBinding made here; never system:masters,
which passes every check and proves nothing. The questions are
SelfSubjectAccessReviews asked as each user (one kubectl call per user), so
the RBAC authorizer itself answers. Then a handful of real requests for the
verbs the admission policies check.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from nubes.api.identity import Project
from nubes.runtime.kube import Kube
from tests import policy_table
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import COMPUTE, IMAGE, NET, condition

CLUSTER_WIDE = ("anyone",)
"""Columns every user holds (bound to system:authenticated)."""


@dataclass(frozen=True)
class User:
    name: str
    project: str | None
    """The namespace its project role is bound in."""
    project_role: str | None
    cluster_roles: tuple[str, ...]

    def expects(self, kind: policy_table.Kind, ns: str, verb: str, name: str) -> bool:
        held = [*self.cluster_roles, *CLUSTER_WIDE]
        if self.project_role and kind.namespaced and ns == self.project:
            held.append(self.project_role)
        return any(policy_table.allows(r, kind.group, kind.resource, verb, name) for r in held)


@dataclass(frozen=True)
class Cloud:
    a: str
    b: str
    users: dict[str, User]


def project(name: str, members: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "apiVersion": "identity.nubes.io/v1alpha1",
        "kind": "Project",
        "metadata": {"name": name},
        "spec": {"members": members},
    }


def can(user: str, verb: str, what: str, ns: str) -> bool:
    got = kubectl("auth", "can-i", verb, what, "-n", ns, check=False, user=user)
    return got.stdout.strip() == "yes"


@pytest.fixture
async def cloud(kube: Kube, controller: Process) -> AsyncIterator[Cloud]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"pt-a-{tag}", f"pt-b-{tag}"
    users = {
        "admin": User(f"pt-admin-{tag}", a, "admin", ()),
        "member": User(f"pt-member-{tag}", a, "member", ()),
        "reader": User(f"pt-reader-{tag}", a, "reader", ()),
        "other": User(f"pt-other-{tag}", b, "admin", ()),
        "cloud": User(f"pt-cloud-{tag}", None, None, ("cloud-admin",)),
    }
    binding = f"test-policy-table-{tag}"
    apply(
        project(
            a,
            [
                {"name": u.name, "role": str(u.project_role)}
                for u in users.values()
                if u.project == a
            ],
        )
    )
    apply(project(b, [{"name": users["other"].name, "role": "admin"}]))
    kubectl(
        "create",
        "clusterrolebinding",
        binding,
        "--clusterrole=nubes:cloud-admin",
        f"--user={users['cloud'].name}",
    )
    try:
        await condition(kube, Project, a, None)
        await condition(kube, Project, b, None)

        def bound() -> bool:
            # Each user's binding in force (else "denied" would prove nothing).
            return (
                can(users["admin"].name, "create", "rolebindings", a)
                and can(users["member"].name, "create", "networks.network.nubes.io", a)
                and can(users["reader"].name, "get", "networks.network.nubes.io", a)
                and can(users["other"].name, "create", "rolebindings", b)
                and can(users["cloud"].name, "create", "flavors.compute.nubes.io", a)
            )

        await eventually(bound, what="policy-table users bound to their roles")
        yield Cloud(a, b, users)
    finally:
        kubectl("delete", "clusterrolebinding", binding, check=False)
        for name in (a, b):
            kubectl("delete", "project", name, "--wait=false", check=False)


def questions(cloud: Cloud) -> list[tuple[policy_table.Kind, str, str, str]]:
    """(kind, namespace, verb, resource name) for every cell of the table."""
    bind_names = ["nubes:project-admin", "nubes:project-member", "nubes:project-reader"]
    asked = []
    for kind in policy_table.kinds():
        ns = cloud.a if kind.namespaced else ""
        names = [*bind_names, "nubes:cloud-admin"] if kind.resource == "clusterroles" else [""]
        for verb in [*policy_table.verbs(), "escalate"]:
            asked += [(kind, ns, verb, name) for name in names]
    return asked


def review(kind: policy_table.Kind, ns: str, verb: str, name: str) -> dict[str, Any]:
    resource, _, sub = kind.resource.partition("/")
    fields = (("group", kind.group), ("namespace", ns), ("subresource", sub), ("name", name))
    attributes = {"resource": resource, "verb": verb} | {k: v for k, v in fields if v}
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }


def answers(user: str, reviews: list[dict[str, Any]]) -> list[bool]:
    """The API server's answers to `reviews` asked as `user` (impersonated)."""
    # No client-side schema check: it lists CRDs, which these users may not.
    argv = ("create", "--validate=false", "-o", "json", "-f", "-")
    made = kubectl(*argv, input=yaml.safe_dump_all(reviews), user=user)
    # One JSON document per object created (a List if kubectl ever wraps them).
    items: list[dict[str, Any]] = []
    decoder, text, at = json.JSONDecoder(), made.stdout, 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        got, at = decoder.raw_decode(text, at)
        items += got["items"] if got.get("kind") == "List" else [got]
    assert len(items) == len(reviews)
    for asked, got in zip(reviews, items, strict=True):
        assert got["spec"]["resourceAttributes"] == asked["spec"]["resourceAttributes"]
    return [bool(got["status"].get("allowed")) for got in items]


async def test_every_cell_of_the_policy_table(cloud: Cloud) -> None:
    asked = questions(cloud)
    reviews = [review(*q) for q in asked]
    wrong = []
    allowed = denied = 0
    for column, user in cloud.users.items():
        for (kind, ns, verb, name), got in zip(asked, answers(user.name, reviews), strict=True):
            want = user.expects(kind, ns, verb, name)
            allowed, denied = allowed + want, denied + (not want)
            if got != want:
                where = f"{kind.resource}.{kind.group or 'core'} ns={ns or '-'} name={name or '-'}"
                wrong.append(f"{column}: {verb} {where}: got {got}, table says {want}")
    assert not wrong, "\n".join(wrong)
    # Both answers occur for every user kind: the table is not all-yes or all-no.
    assert allowed > 100 and denied > 100


def obj(api: str, kind: str, name: str, ns: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def refused(user: str, manifest: dict[str, Any], message: str) -> None:
    got = apply(manifest, check=False, user=user)
    assert got.returncode != 0 and message in got.stderr, got.stderr


def accepted(user: str, manifest: dict[str, Any]) -> None:
    got = apply(manifest, check=False, user=user)
    assert got.returncode == 0, got.stderr


async def test_admission_verbs_in_real_requests(cloud: Cloud) -> None:
    ns = cloud.a
    admin, member = cloud.users["admin"].name, cloud.users["member"].name
    reader, other = cloud.users["reader"].name, cloud.users["other"].name
    holder = cloud.users["cloud"].name
    only_cloud_admin = "only a cloud administrator"

    # Plain RBAC: readers and other projects' admins write nothing here.
    refused(reader, obj(NET, "Network", "net", ns), "forbidden")
    refused(other, obj(NET, "Network", "net", ns), "forbidden")
    accepted(member, obj(NET, "Network", "net", ns))

    # override-lock: project admins hold it, members do not.
    vm = {"flavor": "m1.tiny", "image": {"name": "img"}, "locked": True}
    accepted(member, obj(COMPUTE, "Instance", "vm", ns, **vm))
    stopped = obj(COMPUTE, "Instance", "vm", ns, **vm, powerState="Stopped")
    refused(member, stopped, "instance vm is locked")
    accepted(admin, stopped)

    # The rest are the cloud admin's alone: a project admin is refused.
    cases = [
        ("create-provider", obj(NET, "Network", "shared", ns, shared=True), "provider network"),
        (
            "publicize",
            obj(
                IMAGE,
                "Image",
                "pub",
                ns,
                source={"url": "http://127.0.0.1:9/x"},
                diskFormat="raw",
                visibility="public",
            ),
            only_cloud_admin,
        ),
        (
            "import-file",
            obj(IMAGE, "Image", "file", ns, source={"url": "file:///x.img"}, diskFormat="raw"),
            "file:// sources are for cloud administrators only",
        ),
        (
            "bind-host",
            obj(NET, "Port", "p", ns, network={"name": "net"}, binding={"host": "n1"}),
            only_cloud_admin,
        ),
        (
            "target-node",
            obj(
                COMPUTE,
                "InstanceAction",
                "move",
                ns,
                instance="vm",
                action="Migrate",
                targetNode="n2",
            ),
            only_cloud_admin,
        ),
    ]
    for verb, manifest, message in cases:
        assert policy_table.policy()["admissionVerbs"][verb]
        refused(admin, manifest, message)
        accepted(holder, manifest)
