"""A Project owns its namespace and grants its members their roles."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from nubes.api.identity import Project
from nubes.runtime.kube import NAMESPACES, Kube, path_of
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.conftest import get_condition

NET = """
apiVersion: network.nubes.io/v1alpha1
kind: Network
metadata: {{name: {name}, namespace: {ns}}}
spec: {{}}
"""


@pytest.fixture
async def project(kube: Kube, controller: Process) -> AsyncIterator[str]:
    name = f"p-{uuid.uuid4().hex[:6]}"
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": name},
            "spec": {
                "members": [
                    {"name": "alice", "role": "admin"},
                    {"name": "bob", "role": "member"},
                    {"name": "carol", "role": "reader"},
                ]
            },
        }
    )
    await eventually(lambda: _ready(kube, name), what="project Ready")
    yield name
    kubectl("delete", "project", name, "--wait=false", check=False)


async def _ready(kube: Kube, name: str) -> bool:
    cond = await get_condition(kube, path_of(Project), name, None)
    return bool(cond and cond["status"] == "True")


async def test_project_creates_owned_namespace(kube: Kube, project: str) -> None:
    ns = await kube.get_raw(NAMESPACES, project)
    assert ns is not None
    assert ns["metadata"]["labels"]["nubes.io/project"] == project
    assert ns["metadata"]["ownerReferences"][0]["kind"] == "Project"
    got = await kube.get(Project, project)
    assert got is not None and got.status.namespace == project


async def test_members_get_their_roles(project: str) -> None:
    assert apply(NET.format(name="by-bob", ns=project), user="bob").returncode == 0
    denied = apply(NET.format(name="by-carol", ns=project), user="carol", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
    assert "by-bob" in kubectl("get", "networks", "-n", project, user="carol").stdout
    stranger = kubectl("get", "networks", "-n", project, user="mallory", check=False)
    assert stranger.returncode != 0 and "forbidden" in stranger.stderr
    # Catalogue objects are readable by every authenticated user.
    assert (
        kubectl("get", "flavors", user="mallory", groups=("system:authenticated",)).returncode == 0
    )


async def test_deleting_project_deletes_namespace(kube: Kube, project: str) -> None:
    kubectl("delete", "project", project, "--wait=false")

    async def gone() -> bool:
        ns = await kube.get_raw(NAMESPACES, project)
        return ns is None or ns["metadata"].get("deletionTimestamp") is not None

    await eventually(gone, timeout=60, what="namespace deletion")


async def test_foreign_namespace_is_not_taken(
    kube: Kube, controller: Process, namespace: str
) -> None:
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": f"grab-{namespace}"},
            "spec": {"namespace": namespace},
        }
    )
    try:
        cond = await eventually(
            lambda: get_condition(kube, path_of(Project), f"grab-{namespace}", None, "Stalled"),
            what="Stalled",
        )
        assert cond["reason"] == "NamespaceTaken"
        assert namespace in cond["message"]
        ns = await kube.get_raw(NAMESPACES, namespace)
        assert ns is not None and "nubes.io/project" not in ns["metadata"].get("labels", {})
    finally:
        kubectl("delete", "project", f"grab-{namespace}", "--wait=false", check=False)
