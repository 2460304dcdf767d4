"""Who may use a non-public Flavor or VolumeType: Nova's flavor-access and
Cinder's volume-type-access, checked when an instance is first scheduled, a
Resize is accepted or a volume is placed.

The reasons are FlavorNotAccessible and VolumeTypeNotAccessible rather than
Nova's and Cinder's "not found": every user can list flavor and volume type
names (Kubernetes RBAC cannot hide single objects from a list), so claiming
the object does not exist would hide nothing and only mislead.
"""

from __future__ import annotations

from typing import Protocol

from nubes.api.compute import Flavor
from nubes.api.storage import VolumeType
from nubes.controllers import indexes
from nubes.controllers.image import project_of_namespace
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Stall


class _AccessSpec(Protocol):
    @property
    def is_public(self) -> bool: ...

    @property
    def projects(self) -> list[str]: ...


def index_projects(op: Operator) -> None:
    """The Project index `project_of_namespace` reads (idempotent)."""
    indexes.index_projects(op)


def accessible(spec: _AccessSpec, project: str) -> bool:
    return spec.is_public or project in spec.projects


def require_flavor(op: Operator, flavor: Flavor, namespace: str) -> None:
    """Stall unless the project owning `namespace` may use the flavor."""
    project = project_of_namespace(op, namespace)
    if not accessible(flavor.spec, project):
        raise Stall(
            "FlavorNotAccessible",
            f"flavor {flavor.name} is not public and project {project} is not on its"
            " access list; a cloud administrator can add the project to its spec.projects",
        )


def require_volume_type(op: Operator, vtype: VolumeType, namespace: str) -> None:
    """Stall unless the project owning `namespace` may use the volume type."""
    project = project_of_namespace(op, namespace)
    if not accessible(vtype.spec, project):
        raise Stall(
            "VolumeTypeNotAccessible",
            f"volume type {vtype.name} is not public and project {project} is not on its"
            " access list; a cloud administrator can add the project to its spec.projects",
        )
