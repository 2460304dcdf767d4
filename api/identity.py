"""identity.nubes.io: projects (Keystone tenants), their members and quotas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .meta import (
    AGE_COLUMN,
    CATEGORY,
    READY_COLUMN,
    REASON_COLUMN,
    ApiModel,
    CrdInfo,
    Immutable,
    PrinterColumn,
    Resource,
    Status,
)

GROUP = "identity.nubes.io"

Role = Literal["admin", "member", "reader"]


class Member(ApiModel):
    """A user or group with a role in the project."""

    kind: Literal["User", "Group"] = "User"
    """Kubernetes subject kind."""
    name: str = Field(min_length=1, max_length=253)
    """User or group name as the API server authenticates it."""
    role: Role = "member"
    """admin: everything in the project, including locked instances;
    member: create and change resources; reader: read only."""


class Quotas(ApiModel):
    """Upper bounds on what the project may hold. Absent means unlimited."""

    instances: int | None = Field(default=10, ge=0)
    """Instances."""
    cores: int | None = Field(default=20, ge=0)
    """vCPUs over all instances."""
    ram_mib: int | None = Field(default=51200, ge=0)
    """RAM over all instances, MiB."""
    volumes: int | None = Field(default=10, ge=0)
    """Volumes."""
    gigabytes: int | None = Field(default=1000, ge=0)
    """Volume, snapshot and backup gigabytes."""
    ports: int | None = Field(default=500, ge=0)
    """Ports."""
    floating_ips: int | None = Field(default=50, ge=0)
    """Floating IPs."""


class ProjectSpec(ApiModel):
    """A tenant: owns one namespace, where all its resources live."""

    namespace: Annotated[
        str | None,
        Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        Immutable("namespace"),
    ] = None
    """Namespace owned by the project; defaults to the project name."""
    description: str = Field(default="", max_length=255)
    """Free text."""
    enabled: bool = True
    """Disabled projects keep their resources but members lose access."""
    members: list[Member] = Field(default_factory=list, max_length=256)
    """Role assignments."""
    quotas: Quotas = Field(default_factory=Quotas)
    """Resource limits."""


class ProjectStatus(Status):
    namespace: str | None = None
    """Namespace in use."""


class Project(Resource[ProjectSpec, ProjectStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Project",
        plural="projects",
        short_names=("proj",),
        categories=(CATEGORY, "keystone"),
        scope="Cluster",
        description="A Keystone project: a tenant owning one namespace.",
        printer_columns=(
            PrinterColumn("Namespace", ".status.namespace"),
            PrinterColumn("Enabled", ".spec.enabled", "boolean"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: ProjectSpec = Field(default_factory=ProjectSpec)
    status: ProjectStatus = Field(default_factory=ProjectStatus)
