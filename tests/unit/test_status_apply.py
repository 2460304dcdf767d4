"""Status applies: the body keeps the writer's own fields, and the ownership
rules between writers."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nubes.api.network import Port
from nubes.runtime.informer import LAST_APPLIED, compact
from nubes.runtime.kube import ApiError
from nubes.runtime.status_apply import (
    apply_body,
    conflicting_managers,
    may_take_over,
    own_status_entry,
    owned_fields,
    owners_of,
)


def entry(manager: str, fields: list[str], *, operation: str = "Apply", sub: str = "status") -> Any:
    return {
        "manager": manager,
        "operation": operation,
        "subresource": sub,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:status": {".": {}, **{f"f:{f}": {} for f in fields}}},
    }


PORT: dict[str, Any] = {
    "apiVersion": "network.nubes.io/v1alpha1",
    "kind": "Port",
    "metadata": {
        "name": "p",
        "namespace": "tenant",
        "resourceVersion": "42",
        "managedFields": [
            entry("nubes-controller", ["macAddress", "host", "conditions"]),
            entry("nubes-agent-a", ["binding"]),
            entry("nubes-controller", ["reservations"], operation="Update"),
            {"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}},
        ],
    },
    "spec": {"network": {"name": "n"}},
    "status": {
        "macAddress": "fa:16:3e:00:00:01",
        "host": "a",
        "conditions": [{"type": "Ready", "status": "True"}],
        "binding": {"node": "a", "device": "qvo1", "active": True},
    },
}


def test_owned_fields_are_the_writers_applied_status_fields() -> None:
    managed = PORT["metadata"]["managedFields"]
    assert owned_fields(managed, "nubes-controller") == {"macAddress", "host", "conditions"}
    assert owned_fields(managed, "nubes-agent-a") == {"binding"}
    assert owned_fields(managed, "nubes-agent-b") == set()
    assert owned_fields([entry("x", ["a"], sub="")], "x") == set()


def test_body_keeps_own_fields_lays_changes_over_and_drops_nones() -> None:
    body = apply_body(PORT, "nubes-controller", {"host": "b", "macAddress": None, "mtu": 1450})
    assert body == {
        "apiVersion": "network.nubes.io/v1alpha1",
        "kind": "Port",
        "metadata": {"name": "p", "namespace": "tenant", "resourceVersion": "42"},
        "status": {
            "host": "b",
            "mtu": 1450,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_body_never_carries_another_writers_fields() -> None:
    body = apply_body(PORT, "nubes-agent-a", {"dhcp": {"served": True}})
    assert body is not None
    assert set(body["status"]) == {"binding", "dhcp"}
    fresh = apply_body(PORT, "nubes-agent-b", {"binding": {"node": "b"}})
    assert fresh is not None and fresh["status"] == {"binding": {"node": "b"}}


def test_nothing_to_apply_for_a_writer_that_owns_nothing_and_removes() -> None:
    assert apply_body(PORT, "nubes-agent-b", {"binding": None}) is None
    # A writer giving up its last field still applies (an empty part).
    body = apply_body(PORT, "nubes-agent-a", {"binding": None})
    assert body is not None and body["status"] == {}


def test_body_of_a_typed_object_read_from_the_api() -> None:
    port = Port.model_validate(PORT)
    wire = {**port.wire(), "apiVersion": port.crd.api_version, "kind": port.crd.kind}
    body = apply_body(wire, "nubes-agent-a", {})
    assert body is not None and body["status"] == {"binding": PORT["status"]["binding"]}


def conflict(*managers: str) -> ApiError:
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f'conflict with "{m}" using network.nubes.io/v1alpha1',
            "field": ".status.binding",
        }
        for m in managers
    ]
    return ApiError(409, {"reason": "Conflict", "details": {"causes": causes}})


def test_conflicting_managers_from_the_api_servers_answer() -> None:
    assert conflicting_managers(conflict("nubes-agent-a", "nubes-agent-a")) == ["nubes-agent-a"]
    stale = ApiError(409, {"reason": "Conflict", "message": "the object has been modified"})
    assert conflicting_managers(stale) is None
    assert conflicting_managers(ApiError(422, {"reason": "Invalid"})) is None


@pytest.mark.parametrize(
    ("manager", "other", "allowed"),
    [
        ("nubes-agent-b", "nubes-agent-a", True),  # the object moved
        ("nubes-controller", "nubes-controller-1", True),  # an older shard name
        ("nubes-controller", "kubectl-patch", True),  # a hand edit
        ("nubes-agent-a", "nubes-controller", False),
        ("nubes-controller", "nubes-agent-a", False),
    ],
)
def test_who_may_take_over_a_field(manager: str, other: str, allowed: bool) -> None:
    assert may_take_over(manager, other) is allowed


def test_a_cache_keeps_only_the_own_status_fields_and_bodies_stay_the_same() -> None:
    raw = copy.deepcopy(PORT)
    raw["metadata"]["annotations"] = {LAST_APPLIED: "{...}", "keep": "me"}
    kept = compact(copy.deepcopy(raw), "nubes-agent-a")
    assert kept["metadata"]["managedFields"] == [own_status_entry("nubes-agent-a", {"binding"})]
    assert kept["metadata"]["annotations"] == {"keep": "me"}
    for manager in ("nubes-controller", "nubes-agent-a"):
        changes = {"mtu": 1400}
        assert apply_body(compact(copy.deepcopy(raw), manager), manager, changes) == apply_body(
            raw, manager, changes
        )
    assert "managedFields" not in compact(copy.deepcopy(raw), "nubes-agent-b")["metadata"]


def test_nested_nones_are_left_out_of_an_apply() -> None:
    export = {"portal": "127.0.0.1:3260", "initiatorNode": None, "lun": 1}
    body = apply_body(PORT, "nubes-agent-a", {"export": export})
    assert body is not None and body["status"]["export"] == {"portal": "127.0.0.1:3260", "lun": 1}


def test_owners_of_status_fields_whatever_the_operation() -> None:
    managed = PORT["metadata"]["managedFields"]
    assert owners_of(managed, {"binding"}) == {"nubes-agent-a"}
    assert owners_of(managed, {"reservations", "host"}) == {"nubes-controller"}
    assert owners_of(managed, {"nothing"}) == set()
