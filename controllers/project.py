"""Project: the tenant's namespace and the role bindings of its members."""

from __future__ import annotations

from typing import Any

from nubes.api.identity import Project
from nubes.runtime.kube import NAMESPACES, ROLEBINDINGS
from nubes.runtime.reconcile import Outcome, Reconciler, Stall

PROJECT_LABEL = "nubes.io/project"
ROLES = ("admin", "member", "reader")


def namespace_of(project: Project) -> str:
    return project.spec.namespace or project.name


def owner_reference(project: Project) -> dict[str, Any]:
    return {
        "apiVersion": project.crd.api_version,
        "kind": project.crd.kind,
        "name": project.name,
        "uid": project.uid,
        "controller": True,
    }


def role_binding(project: Project, role: str) -> dict[str, Any]:
    subjects = (
        [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": m.kind, "name": m.name}
            for m in project.spec.members
            if m.role == role
        ]
        if project.spec.enabled
        else []
    )
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": f"nubes-project-{role}",
            "namespace": namespace_of(project),
            "labels": {PROJECT_LABEL: project.name},
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"nubes:project-{role}",
        },
        "subjects": subjects,
    }


class ProjectReconciler(Reconciler[Project]):
    kind = Project
    workers = 2

    async def converge(self, obj: Project) -> Outcome:
        kube = self.op.kube
        name = namespace_of(obj)
        namespace = await kube.get_raw(NAMESPACES, name)
        if namespace is None:
            await kube.create_raw(
                NAMESPACES,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "labels": {PROJECT_LABEL: obj.name},
                        # Deleting the project deletes the namespace (and all in it).
                        "ownerReferences": [owner_reference(obj)],
                    },
                },
            )
        else:
            owner = namespace["metadata"].get("labels", {}).get(PROJECT_LABEL)
            if owner != obj.name:
                raise Stall(
                    "NamespaceTaken",
                    f"namespace {name} already exists and belongs to "
                    + (f"project {owner}" if owner else "no project"),
                )
            if namespace.get("status", {}).get("phase") == "Terminating":
                return Outcome.progressing(
                    "NamespaceTerminating",
                    f"namespace {name} is being deleted",
                    requeue_after=2,
                )
        for role in ROLES:
            await kube.apply_raw(ROLEBINDINGS, role_binding(obj, role))
        members = len(obj.spec.members)
        return Outcome.ready(
            {"namespace": name},
            f"namespace {name}, {members} member{'s' if members != 1 else ''}"
            + ("" if obj.spec.enabled else " (disabled: no access)"),
        )
