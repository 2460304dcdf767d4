"""What an instance is after its one-shot actions (pure, the controller's
reasoning): the spec names the flavor and image an instance was created
with; every InstanceAction that completed since changes them: a Resize the
flavor, a Rebuild the image, a Rescue/Unrescue the rescue mode, a Migrate or
Resize the node. The node agent never derives this: it reads the result in
status.intent (nubes.controllers.intent)."""

from __future__ import annotations

from dataclasses import dataclass

from nubes.api.compute import Instance, InstanceAction
from nubes.api.lifecycle import MOVES, completed
from nubes.api.meta import ProjectRef


@dataclass(frozen=True)
class Effective:
    flavor: str
    image: ProjectRef | None
    rescued: bool
    move: InstanceAction | None
    """The latest completed Migrate or Resize, if any."""


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
