"""What an instance is after its one-shot actions (pure, shared by the
controller and the node agent so both derive the same answer).

The spec names the flavor and image an instance was created with; every
InstanceAction that completed since changes them: a Resize the flavor, a
Rebuild the image, a Rescue/Unrescue the rescue mode, a Migrate or Resize
the node.
"""

from __future__ import annotations

from dataclasses import dataclass

from .compute import Instance, InstanceAction
from .meta import ProjectRef

MOVES = ("Migrate", "Resize")


@dataclass(frozen=True)
class Effective:
    flavor: str
    image: ProjectRef | None
    rescued: bool
    move: InstanceAction | None
    """The latest completed Migrate or Resize, if any."""


def completed(actions: list[InstanceAction]) -> list[InstanceAction]:
    """Actions that finished without error, in the order they finished."""
    done = [a for a in actions if a.status.completed_at and a.status.error is None]
    return sorted(done, key=lambda a: a.status.completed_at or "")


def effective(inst: Instance, actions: list[InstanceAction]) -> Effective:
    flavor, image, rescued, move = inst.spec.flavor, inst.spec.image, False, None
    for action in completed(actions):
        kind = action.spec.action
        if kind == "Resize" and action.status.flavor:
            flavor = action.status.flavor
        if kind in MOVES:
            move = action
        if kind == "Rebuild" and action.status.image:
            namespace, _, name = action.status.image.partition("/")
            image = ProjectRef(name=name, namespace=namespace)
        if kind == "Rescue":
            rescued = True
        if kind == "Unrescue":
            rescued = False
    return Effective(flavor, image, rescued, move)


def placement(inst: Instance, eff: Effective) -> tuple[str | None, str | None]:
    """(node, since) with a completed move applied: the move's target from the
    moment it completed, before the controller records it in status."""
    move = eff.move
    since = inst.status.node_since or ""
    if move and move.status.target_node and since < (move.status.completed_at or ""):
        return move.status.target_node, move.status.completed_at
    return inst.status.node, inst.status.node_since


def pending(actions: list[InstanceAction]) -> InstanceAction | None:
    """The action to run next: the oldest unfinished one the controller accepted."""
    waiting = sorted(
        (a for a in actions if not a.status.completed_at and not a.deleting),
        key=lambda a: (a.metadata.creation_timestamp or "", a.name),
    )
    if not waiting or not waiting[0].status.source_node or waiting[0].status.is_true("Stalled"):
        return None
    return waiting[0]
