"""Disabling a project suspends the RoleBindings its admins made to the
project roles, and enabling it gives their subjects back."""

from __future__ import annotations

import json
from typing import Any

from nubes.controllers.project import SUSPENDED, suspension_patch

ALICE = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}
APP = {"kind": "ServiceAccount", "name": "ci", "namespace": "p1"}


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
        assert suspension_patch(b, enabled=True) == {
            "metadata": {"annotations": {SUSPENDED: None}},
            "subjects": [APP],
        }
