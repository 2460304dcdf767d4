"""The instance after its completed one-shot actions, as controller and agent
both derive it."""

from __future__ import annotations

from typing import Any

from nubes.api.compute import Instance, InstanceAction
from nubes.api.lifecycle import last_move, pending, placement
from nubes.controllers.lifecycle import effective


def instance(**status: Any) -> Instance:
    return Instance.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "p", "uid": "u1"},
            "spec": {"flavor": "small", "image": {"name": "cirros"}},
            "status": status,
        }
    )


def action(name: str, kind: str, created: str, **status: Any) -> InstanceAction:
    spec: dict[str, Any] = {"instance": "vm", "action": kind}
    if kind == "Resize":
        spec["flavor"] = status.get("flavor", "big")
    if kind == "Rebuild":
        spec["image"] = {"name": "other"}
    return InstanceAction.model_validate(
        {
            "metadata": {"name": name, "namespace": "p", "creationTimestamp": created},
            "spec": spec,
            "status": status,
        }
    )


def test_completed_actions_change_flavor_image_and_rescue_in_completion_order() -> None:
    actions = [
        action("a", "Resize", "t1", completedAt="2026-01-01T00:00:03Z", flavor="big"),
        action("b", "Rebuild", "t2", completedAt="2026-01-01T00:00:01Z", image="p/other"),
        action("c", "Rescue", "t3", completedAt="2026-01-01T00:00:02Z"),
        action("d", "Resize", "t4", flavor="huge"),  # not completed: no effect
        action(
            "e",
            "Unrescue",
            "t5",
            completedAt="2026-01-01T00:00:04Z",
            error={"reason": "Failed", "message": "x"},
        ),  # failed: no effect
    ]
    eff = effective(instance(), actions)
    assert eff.flavor == "big"
    assert eff.image is not None and (eff.image.namespace, eff.image.name) == ("p", "other")
    assert eff.rescued is True
    assert eff.move is actions[0]


def test_a_completed_move_places_the_instance_on_its_target_before_status_says_so() -> None:
    moved = action("m", "Migrate", "t1", targetNode="n2", completedAt="2026-01-01T00:00:05Z")
    inst = instance(node="n1", nodeSince="2026-01-01T00:00:00Z")
    assert placement(inst, last_move([moved])) == ("n2", "2026-01-01T00:00:05Z")
    # Once status records a later placement (say, after unshelving), the old
    # move no longer decides.
    later = instance(node="n3", nodeSince="2026-01-01T00:00:09Z")
    assert placement(later, last_move([moved])) == ("n3", "2026-01-01T00:00:09Z")
    assert placement(inst, last_move([])) == ("n1", "2026-01-01T00:00:00Z")


def test_pending_is_the_oldest_accepted_unfinished_action() -> None:
    waiting = action("w", "HardReboot", "2026-01-01T00:00:02Z", sourceNode="n1")
    older_unaccepted = action("o", "SoftReboot", "2026-01-01T00:00:01Z")
    assert pending([waiting]) is waiting
    # The oldest is not accepted yet: nothing runs out of order.
    assert pending([waiting, older_unaccepted]) is None
    done = action("d", "SoftReboot", "2026-01-01T00:00:00Z", completedAt="x", sourceNode="n1")
    assert pending([done, waiting]) is waiting
