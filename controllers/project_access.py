"""Who may use a project: its RoleBindings, as the Project reconciler keeps
them (pure: each function turns objects read from the API server into the
objects or merge patches to write).

- The controller's own bindings (`nubes-project-admin`, `-member`,
  `-reader`) bind the Project's `spec.members` by role; the Project's
  `status.bound` records whom the bindings were last made for, so a member
  who left the spec, or went down a role, is known at the next pass.
- Bindings project admins made to the project roles (members they added,
  application credentials) are theirs, but:
  - disabling the project suspends them: their subjects wait in an
    annotation (SUSPENDED) until it is enabled again;
  - a user or group that lost a role in `spec.members` (roles are ordered:
    admin holds member's rights, member reader's) is taken out of every
    binding to that role, so whatever they granted themselves goes with the
    role (Keystone deletes a user's application credentials with their role
    assignment: the reconciler also deletes those they created);
  - a ServiceAccount is bound only if it is an application credential of
    the project (labelled, with a life, ended with its creator's role): any
    other (`default`, one of another project) would keep the role for as
    long as its tokens last.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from nubes.api.identity import Member, Project
from nubes.api.meta import ApiModel, CrdInfo, Resource, Status
from nubes.runtime.credentials import APP_CREDENTIAL_LABEL, CREATOR_ANNOTATION, ROLE_LABEL, ROLES

PROJECT_LABEL = "nubes.io/project"
SUSPENDED = "nubes.io/suspended-subjects"
RANK = tuple(reversed(ROLES))
"""Roles from the least: each holds the rights of those before it."""
RBAC = "rbac.authorization.k8s.io"

# The controller's own bindings, by name and role: the nubes-project-bindings
# policy keeps these names and the SUSPENDED annotation for the controller.
OURS = {f"nubes-project-{role}": f"nubes:project-{role}" for role in ROLES}


class _Nothing(ApiModel):
    pass


class RoleBindingSeen(Resource[_Nothing, Status]):
    """RoleBindings as the Project reconciler watches them: their metadata
    only (a change makes it look at the project's bindings again)."""

    crd = CrdInfo(group=RBAC, kind="RoleBinding", plural="rolebindings", version="v1")
    spec: _Nothing = Field(default_factory=_Nothing)
    status: Status = Field(default_factory=Status)


Subject = tuple[str, str]
"""(kind, name) of a user or group."""


def namespace_of(project: Project) -> str:
    return project.spec.namespace or project.name


def members_with(project: Project, role: str) -> list[Subject]:
    return [(m.kind, m.name) for m in project.spec.members if m.role == role]


def _ranks(members: list[Member]) -> dict[Subject, int]:
    """Each subject's highest role, as its rank in RANK."""
    ranks: dict[Subject, int] = {}
    for m in members:
        key = (m.kind, m.name)
        ranks[key] = max(ranks.get(key, -1), RANK.index(m.role))
    return ranks


def lost_roles(project: Project) -> dict[str, set[Subject]]:
    """Per role, the users and groups that held it (or one above it) when
    the bindings were last made, and no longer do."""
    before = _ranks(project.status.bound or [])
    now = _ranks(project.spec.members)
    lost: dict[str, set[Subject]] = {}
    for subject, rank in before.items():
        for role in RANK[now.get(subject, -1) + 1 : rank + 1]:
            lost.setdefault(role, set()).add(subject)
    return lost


def role_binding(project: Project, role: str) -> dict[str, Any]:
    # A disabled project keeps its bindings but binds nobody: access goes at
    # once (RBAC reads bindings from the API server's watch cache) and comes
    # back with the members' list on re-enabling, without delete rights here.
    members = members_with(project, role)
    subjects = [{"apiGroup": RBAC, "kind": k, "name": n} for k, n in members]
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": f"nubes-project-{role}",
            "namespace": namespace_of(project),
            "labels": {PROJECT_LABEL: project.name},
        },
        "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": f"nubes:project-{role}"},
        "subjects": subjects if project.spec.enabled else [],
    }


def binding_patch(
    binding: dict[str, Any],
    *,
    enabled: bool,
    lost: dict[str, set[Subject]],
    credentials: set[str],
    namespace: str,
) -> dict[str, Any] | None:
    """A merge patch for a RoleBinding a project admin made to a project
    role (None when it needs none, or is ours or about other roles): the
    subjects that may keep the role, suspended (disabled) or given back."""
    role = binding.get("roleRef", {}).get("name", "")
    name = binding.get("metadata", {}).get("name", "")
    if not role.startswith("nubes:project-") or OURS.get(name) == role:
        return None
    gone = lost.get(role.removeprefix("nubes:project-"), set())

    def allowed(s: dict[str, Any]) -> bool:
        if s.get("kind") == "ServiceAccount":
            return s.get("namespace", namespace) == namespace and s.get("name") in credentials
        return (s.get("kind"), s.get("name")) not in gone

    current = binding.get("subjects") or []
    annotated = SUSPENDED in (binding.get("metadata", {}).get("annotations") or {})
    held = _subjects(_annotation(binding, SUSPENDED)) if annotated else []
    keep = [s for s in current if allowed(s)]
    kept = [s for s in held if allowed(s)]
    if not enabled:
        subjects, waiting = [], [*kept, *(s for s in keep if s not in kept)]
    else:
        subjects, waiting = [*keep, *(s for s in kept if s not in keep)], None
    patch: dict[str, Any] = {}
    if subjects != current:
        patch["subjects"] = subjects
    if waiting is not None and (not annotated or waiting != held):
        patch["metadata"] = {"annotations": {SUSPENDED: json.dumps(waiting)}}
    elif waiting is None and annotated:
        patch["metadata"] = {"annotations": {SUSPENDED: None}}
    return patch or None


def credentials_to_end(
    accounts: list[dict[str, Any]], lost: dict[str, set[Subject]]
) -> list[dict[str, Any]]:
    """Application credentials whose creator lost the role they carry."""
    found = []
    for account in accounts:
        meta = account.get("metadata", {})
        labels = meta.get("labels") or {}
        creator = (meta.get("annotations") or {}).get(CREATOR_ANNOTATION)
        role = labels.get(ROLE_LABEL, "")
        if labels.get(APP_CREDENTIAL_LABEL) == "true" and ("User", creator) in lost.get(role, ()):
            found.append(account)
    return found


def _annotation(binding: dict[str, Any], key: str) -> Any:
    return (binding.get("metadata", {}).get("annotations") or {}).get(key)


def _load(text: Any) -> list[Any]:
    """A JSON list from an annotation; nothing from one that is not ours (the
    policy lets no one else write it; still, never fail a pass on it)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []


def _subjects(text: Any) -> list[dict[str, Any]]:
    return [s for s in _load(text) if isinstance(s, dict)]
