"""Node labels (which agents cache an object): valid label keys for every
node name, the merge patch that keeps them, and the nodes of an instance
during a move."""

from __future__ import annotations

import re
from typing import Any

import pytest

from nubes.api.compute import InstanceAction
from nubes.api.nodes import NODE_LABEL_PREFIX, node_label, node_labels_patch, valid_label_name
from nubes.controllers.instance import moving_nodes

# Kubernetes' qualified-name rule for the name part of a label key.
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def name_part(key: str) -> str:
    assert key.startswith(NODE_LABEL_PREFIX)
    return key[len(NODE_LABEL_PREFIX) :]


@pytest.mark.parametrize(
    "node",
    [
        "s1",
        "node-1.example.com",
        "a" * 63,
        "a" * 64,
        "n" * 253,
        "x." * 40 + "y",
        "-odd-",
        "UPPER_case",
        "ünïcode",
    ],
)
def test_every_node_name_gives_a_valid_label_key(node: str) -> None:
    name = name_part(node_label(node))
    assert len(name) <= 63 and LABEL_NAME.match(name), name
    assert valid_label_name(name)


def test_short_names_are_kept_as_they_are() -> None:
    assert node_label("s1") == "node.nubes.io/s1"
    assert node_label("a" * 63) == "node.nubes.io/" + "a" * 63


def test_long_names_sharing_a_prefix_get_different_keys() -> None:
    one, two = "compute-" + "x" * 80 + "-1", "compute-" + "x" * 80 + "-2"
    assert node_label(one) != node_label(two)
    assert node_label(one) == node_label(one)
    assert name_part(node_label(one)).startswith("compute-xxx")


def test_no_node_no_label() -> None:
    with pytest.raises(ValueError, match="node name"):
        node_label("")


def test_patch_adds_wanted_and_removes_stale_node_labels_only() -> None:
    current = {"app": "web", "node.nubes.io/a": "", "node.nubes.io/b": ""}
    assert node_labels_patch(current, ["b", "c", None, "c"]) == {
        "node.nubes.io/c": "",
        "node.nubes.io/a": None,
    }
    assert node_labels_patch(current, ["a", "b"]) is None
    assert node_labels_patch(None, []) is None
    assert node_labels_patch({"app": "web"}, [None]) is None
    # A label someone else put on for a node the object does not concern goes.
    assert node_labels_patch({"node.nubes.io/z": "x"}, ["a"]) == {
        "node.nubes.io/a": "",
        "node.nubes.io/z": None,
    }


def action(name: str, kind: str, **status: Any) -> InstanceAction:
    spec: dict[str, Any] = {"instance": "vm", "action": kind}
    if kind == "Resize":
        spec["flavor"] = "big"
    return InstanceAction.model_validate(
        {"metadata": {"name": name, "namespace": "p"}, "spec": spec, "status": status}
    )


def test_a_move_concerns_source_and_target_until_the_instance_records_it() -> None:
    done = "2026-01-01T00:00:05Z"
    running = action("m", "Migrate", sourceNode="n1", targetNode="n2")
    assert moving_nodes({"node": "n1"}, [running]) == {"n1", "n2"}
    finished = action("m", "Migrate", sourceNode="n1", targetNode="n2", completedAt=done)
    # Completed, not yet recorded (nodeSince older): both still take part.
    assert moving_nodes({"node": "n1", "nodeSince": "2026-01-01T00:00:01Z"}, [finished]) == {
        "n1",
        "n2",
    }
    # Recorded: the instance is on n2 alone (its node comes from status.node).
    assert moving_nodes({"node": "n2", "nodeSince": done}, [finished]) == set()
    failed = action(
        "f",
        "Migrate",
        sourceNode="n1",
        targetNode="n2",
        completedAt=done,
        error={"reason": "Failed", "message": "x"},
    )
    assert moving_nodes({"node": "n1"}, [failed]) == set()


def test_actions_in_place_add_no_node() -> None:
    reboot = action("r", "SoftReboot", sourceNode="n1", targetNode="n1")
    resize_here = action("z", "Resize", sourceNode="n1", targetNode="n1")
    assert moving_nodes({"node": "n1"}, [reboot, resize_here]) == set()
