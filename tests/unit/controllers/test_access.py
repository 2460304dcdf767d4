"""Flavor and volume type access lists (Nova flavor-access, Cinder
volume-type-access): which project may use what, judged from the
controller's caches."""

from __future__ import annotations

from typing import Any

import pytest

from nubes.api.compute import Flavor
from nubes.api.identity import Project
from nubes.api.storage import VolumeType
from nubes.controllers.access import (
    accessible,
    index_projects,
    require_flavor,
    require_volume_type,
)
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Stall


def flavor(**spec: Any) -> Flavor:
    return Flavor.model_validate(
        {"metadata": {"name": "gold"}, "spec": {"vcpus": 1, "ramMib": 256, **spec}}
    )


def volume_type(**spec: Any) -> VolumeType:
    return VolumeType.model_validate({"metadata": {"name": "fast"}, "spec": spec})


def operator(*projects: tuple[str, str]) -> Operator:
    """An operator whose Project cache holds (name, namespace) pairs."""
    op = Operator("test", None)  # type: ignore[arg-type]  # caches only, no API calls
    index_projects(op)
    for name, namespace in projects:
        op.store(Project).upsert(
            Project.model_validate(
                {
                    "metadata": {"name": name, "resourceVersion": "1"},
                    "spec": {"namespace": namespace},
                    "status": {"namespace": namespace},
                }
            )
        )
    return op


def test_public_is_for_everyone_and_private_only_for_listed_projects() -> None:
    assert accessible(flavor().spec, "anyone")
    assert not accessible(flavor(isPublic=False).spec, "p1")
    assert accessible(flavor(isPublic=False, projects=["p0", "p1"]).spec, "p1")
    assert accessible(volume_type().spec, "anyone")
    assert not accessible(volume_type(isPublic=False, projects=["p0"]).spec, "p1")


def test_the_project_is_the_one_owning_the_namespace() -> None:
    op = operator(("acme", "acme-prod"), ("rival", "acme"))
    private = flavor(isPublic=False, projects=["acme"])
    require_flavor(op, private, "acme-prod")  # no Stall
    with pytest.raises(Stall) as refused:
        require_flavor(op, private, "acme")  # named like the project, owned by another
    assert refused.value.reason == "FlavorNotAccessible"
    assert refused.value.message == (
        "flavor gold is not public and project rival is not on its access list;"
        " a cloud administrator can add the project to its spec.projects"
    )


def test_volume_types_stall_with_their_own_reason() -> None:
    op = operator(("acme", "acme"))
    require_volume_type(op, volume_type(isPublic=False, projects=["acme"]), "acme")
    with pytest.raises(Stall) as refused:
        require_volume_type(op, volume_type(isPublic=False), "acme")
    assert refused.value.reason == "VolumeTypeNotAccessible"
    assert "volume type fast is not public and project acme" in refused.value.message
