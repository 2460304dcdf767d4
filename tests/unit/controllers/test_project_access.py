"""Who may use a project (controllers/project_access.py): disabling it
suspends the RoleBindings its admins made to the project roles and enabling
it gives their subjects back; a member who loses a role loses what they
granted with it; only application credentials among the project's
ServiceAccounts are bound."""

from __future__ import annotations

import json
from typing import Any

from nubes.api.identity import Project
from nubes.controllers.project_access import (
    SUSPENDED,
    binding_patch,
    credentials_to_end,
    lost_roles,
)

ALICE = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}
APP = {"kind": "ServiceAccount", "name": "ci", "namespace": "p1"}


def suspension_patch(b: Any, enabled: bool) -> Any:
    return binding_patch(b, enabled=enabled, lost={}, credentials={"ci"}, namespace="p1")


def binding(name: str, role: str, subjects: list[Any], held: list[Any] | None = None) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": "p1"}
    if held is not None:
        meta["annotations"] = {SUSPENDED: json.dumps(held)}
    return {"metadata": meta, "roleRef": {"name": role}, "subjects": subjects}


def test_disabling_moves_subjects_into_the_annotation_and_back() -> None:
    b = binding("app-ci", "nubes:project-member", [ALICE, APP])
    patch = suspension_patch(b, enabled=False)
    assert patch == {
        "metadata": {"annotations": {SUSPENDED: json.dumps([ALICE, APP])}},
        "subjects": [],
    }
    suspended = binding("app-ci", "nubes:project-member", [], [ALICE, APP])
    assert suspension_patch(suspended, enabled=False) is None
    back = suspension_patch(suspended, enabled=True)
    assert back == {"metadata": {"annotations": {SUSPENDED: None}}, "subjects": [ALICE, APP]}
    assert suspension_patch(binding("x", "nubes:project-reader", [APP]), enabled=True) is None


def test_subjects_added_while_suspended_are_kept_too() -> None:
    b = binding("m", "nubes:project-reader", [APP], [ALICE])
    patch = suspension_patch(b, enabled=False)
    assert patch is not None
    assert json.loads(patch["metadata"]["annotations"][SUSPENDED]) == [ALICE, APP]


def test_other_bindings_are_left_alone() -> None:
    ours = binding("nubes-project-member", "nubes:project-member", [ALICE])
    foreign = binding("view", "view", [ALICE])
    for b in (ours, foreign):
        assert suspension_patch(b, enabled=False) is None
        assert suspension_patch(b, enabled=True) is None


def test_only_the_controllers_own_bindings_are_spared() -> None:
    # Our prefix, or our name with another role, is a project admin's binding.
    for b in (
        binding("nubes-project-keep", "nubes:project-admin", [ALICE]),
        binding("nubes-project-reader", "nubes:project-admin", [ALICE]),
    ):
        assert suspension_patch(b, enabled=False) == {
            "metadata": {"annotations": {SUSPENDED: json.dumps([ALICE])}},
            "subjects": [],
        }


def test_an_annotation_that_is_not_ours_never_fails_a_pass() -> None:
    for text in ("x", "{}", "[1, 2]", "null"):
        b = binding("app", "nubes:project-member", [APP])
        b["metadata"]["annotations"] = {SUSPENDED: text}
        assert suspension_patch(b, enabled=False) == {
            "metadata": {"annotations": {SUSPENDED: json.dumps([APP])}},
            "subjects": [],
        }
        # Enabled, the subjects in place stay; the annotation goes.
        assert suspension_patch(b, enabled=True) == {"metadata": {"annotations": {SUSPENDED: None}}}


def project(
    *members: tuple[str, str], bound: list[tuple[str, str]] | None = None, enabled: bool = True
) -> Project:
    def listed(pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> list[Any]:
        return [{"name": n, "role": r} for n, r in pairs]

    return Project.model_validate(
        {
            "metadata": {"name": "p1", "uid": "u1"},
            "spec": {"enabled": enabled, "members": listed(members)},
            "status": {"bound": listed(bound)} if bound is not None else {},
        }
    )


def test_roles_lost_are_those_above_what_is_left() -> None:
    was = [("alice", "admin"), ("bob", "member"), ("carol", "reader")]
    alice, bob = ("User", "alice"), ("User", "bob")
    assert lost_roles(project(*was, bound=was)) == {}
    assert lost_roles(project(*was)) == {}  # nothing recorded yet: nothing known lost
    # Down from admin to reader: admin and member go; removed: every role.
    demoted = project(("alice", "reader"), ("carol", "reader"), bound=was)
    assert lost_roles(demoted) == {"admin": {alice}, "member": {alice, bob}, "reader": {bob}}
    # Up a role loses nothing; listed twice, the higher role counts.
    promoted = project(("bob", "admin"), ("alice", "admin"), ("alice", "reader"), bound=was)
    assert lost_roles(promoted) == {"reader": {("User", "carol")}}


def test_a_role_taken_from_a_member_takes_what_they_granted_with_it() -> None:
    lost = lost_roles(project(("alice", "reader"), bound=[("alice", "admin")]))
    assert lost == {"admin": {("User", "alice")}, "member": {("User", "alice")}}
    own = binding("mine", "nubes:project-admin", [ALICE, APP])
    patch = binding_patch(own, enabled=True, lost=lost, credentials={"ci"}, namespace="p1")
    assert patch == {"subjects": [APP]}
    # A reader's binding is hers still; a suspended binding loses her likewise.
    reader = binding("r", "nubes:project-reader", [ALICE])
    assert binding_patch(reader, enabled=True, lost=lost, credentials=set(), namespace="p1") is None
    held = binding("held", "nubes:project-member", [], [ALICE, APP])
    patch = binding_patch(held, enabled=False, lost=lost, credentials={"ci"}, namespace="p1")
    assert patch == {"metadata": {"annotations": {SUSPENDED: json.dumps([APP])}}}

    made = (("a1", "admin", "alice"), ("a2", "reader", "alice"), ("b1", "admin", "bob"))
    accounts = [
        {"metadata": {"name": n, "labels": {"nubes.io/app-credential": "true", "nubes.io/role": r},
                      "annotations": {"nubes.io/created-by": who}}}
        for n, r, who in made
    ]  # fmt: skip
    assert [a["metadata"]["name"] for a in credentials_to_end(accounts, lost)] == ["a1"]


def test_only_application_credentials_of_the_project_are_bound() -> None:
    default = {"kind": "ServiceAccount", "name": "default", "namespace": "p1"}
    elsewhere = {"kind": "ServiceAccount", "name": "ci", "namespace": "p2"}
    b = binding("bots", "nubes:project-member", [APP, default, elsewhere])
    patch = binding_patch(b, enabled=True, lost={}, credentials={"ci"}, namespace="p1")
    assert patch == {"subjects": [APP]}
