"""Facts about an instance's one-shot actions both tiers read (pure): which
actions finished, which runs next, the last move and where it put the
instance. What the instance *is* after its actions (flavor, image, rescue)
is the controller's reasoning (nubes.controllers.lifecycle); the node gets
the answer in the instance's status.intent.
"""

from __future__ import annotations

from .compute import Instance, InstanceAction

MOVES = ("Migrate", "Resize")


def completed(actions: list[InstanceAction]) -> list[InstanceAction]:
    """Actions that finished without error, in the order they finished."""
    done = [a for a in actions if a.status.completed_at and a.status.error is None]
    return sorted(done, key=lambda a: a.status.completed_at or "")


def last_move(actions: list[InstanceAction]) -> InstanceAction | None:
    """The latest completed Migrate or Resize, if any."""
    moves = [a for a in completed(actions) if a.spec.action in MOVES]
    return moves[-1] if moves else None


def placement(inst: Instance, move: InstanceAction | None) -> tuple[str | None, str | None]:
    """(node, since) with a completed move applied: the move's target from the
    moment it completed, before the controller records it in status."""
    since = inst.status.node_since or ""
    if move and move.status.target_node and since < (move.status.completed_at or ""):
        return move.status.target_node, move.status.completed_at
    return inst.status.node, inst.status.node_since


def incoming_node(actions: list[InstanceAction], node: str | None) -> str | None:
    """Target of the move under way when it is not `node` (its agent caches
    the instance through this, status.incomingNode, before status.node)."""
    move = pending(actions)
    if move is None or move.spec.action not in MOVES:
        return None
    target = move.status.target_node
    return target if target and target != node else None


def pending(actions: list[InstanceAction]) -> InstanceAction | None:
    """The action to run next: the oldest unfinished one the controller accepted."""
    waiting = sorted(
        (a for a in actions if not a.status.completed_at and not a.deleting),
        key=lambda a: (a.metadata.creation_timestamp or "", a.name),
    )
    if not waiting or not waiting[0].status.source_node or waiting[0].status.is_true("Stalled"):
        return None
    return waiting[0]
