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
    """Upper bounds on what the project may hold; -1 means unlimited, as in
    OpenStack. Lowering a quota below usage keeps what exists and refuses more."""

    instances: int | None = Field(default=10, ge=-1)
    """Instances."""
    cores: int | None = Field(default=20, ge=-1)
    """vCPUs over all instances."""
    ram_mib: int | None = Field(default=51200, ge=-1)
    """RAM over all instances, MiB."""
    volumes: int | None = Field(default=10, ge=-1)
    """Volumes."""
    gigabytes: int | None = Field(default=1000, ge=-1)
    """Volume, snapshot and backup gigabytes."""
    ports: int | None = Field(default=500, ge=-1)
    """Ports."""
    floating_ips: int | None = Field(default=50, ge=-1)
    """Floating IPs."""
    snapshots: int | None = Field(default=10, ge=-1)
    """Volume snapshots."""
    backups: int | None = Field(default=10, ge=-1)
    """Volume backups."""
    networks: int | None = Field(default=100, ge=-1)
    """Networks."""
    subnets: int | None = Field(default=100, ge=-1)
    """Subnets."""
    routers: int | None = Field(default=10, ge=-1)
    """Routers."""
    security_groups: int | None = Field(default=10, ge=-1)
    """Security groups."""
    images: int | None = Field(default=100, ge=-1)
    """Images (Glance's image_count_total): imports and instance snapshots."""
    image_size_mib: int | None = Field(default=102400, ge=-1)
    """MiB of image data over all the project's images (Glance's
    image_size_total). Checked before an import starts and again with the
    data's real size once it is fetched: an image that would go over is
    Stalled with reason QuotaExceeded and its data removed."""
    security_group_rules: int | None = Field(default=100, ge=-1)
    """Rules over all security groups (the default group's four included);
    a group that would go over is Stalled with reason QuotaExceeded and not
    enforced."""


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
    """Disabled projects keep their resources but members lose access (their
    role bindings bind nobody) until re-enabled. The project stays Ready, with
    reason `Disabled`."""
    members: list[Member] = Field(default_factory=list, max_length=256)
    """Role assignments."""
    quotas: Quotas = Field(default_factory=Quotas)
    """Resource limits."""


class UsageItem(ApiModel):
    """One quota: what the project holds against its limit."""

    used: int = 0
    """In use (counted objects, or the sum the quota ledger holds)."""
    limit: int | None = None
    """The quota; absent: unlimited."""
    summary: str = ""
    """`used/limit` (or `used/unlimited`), for kubectl columns."""


class ProjectUsage(ApiModel):
    """Usage against each quota (written by the controller)."""

    instances: UsageItem | None = None
    """Instances."""
    cores: UsageItem | None = None
    """vCPUs of instances not shelved."""
    ram_mib: UsageItem | None = None
    """RAM of instances not shelved, MiB."""
    volumes: UsageItem | None = None
    """Volumes."""
    snapshots: UsageItem | None = None
    """Volume snapshots."""
    backups: UsageItem | None = None
    """Volume backups."""
    gigabytes: UsageItem | None = None
    """GiB of volumes, snapshots and backups."""
    ports: UsageItem | None = None
    """Ports."""
    floating_ips: UsageItem | None = None
    """Floating IPs."""
    networks: UsageItem | None = None
    """Networks."""
    subnets: UsageItem | None = None
    """Subnets."""
    routers: UsageItem | None = None
    """Routers."""
    security_groups: UsageItem | None = None
    """Security groups."""
    images: UsageItem | None = None
    """Images."""
    image_size_mib: UsageItem | None = None
    """MiB of image data."""


class Reservation(ApiModel):
    """What one consumer holds of the project's summed quotas."""

    kind: str
    """Kind of the consumer (Instance, Volume, VolumeSnapshot, VolumeBackup,
    InstanceAction, Image)."""
    cores: int = 0
    """vCPUs held."""
    ram_mib: int = 0
    """RAM held, MiB."""
    gigabytes: int = 0
    """Volume, snapshot or backup GiB held."""
    image_size_mib: int = 0
    """Image data held, MiB."""


class ProjectStatus(Status):
    namespace: str | None = None
    """Namespace in use."""
    usage: ProjectUsage | None = None
    """Usage against each quota."""
    reservations: dict[str, Reservation] = Field(default_factory=dict)
    """The quota ledger of cores, RAM, gigabytes and image MiB, by consumer uid: written with
    resourceVersion preconditions, so concurrent controller workers never
    overshoot a limit."""
    bound: list[Member] | None = Field(default=None, max_length=256)
    """The members whose roles the project's bindings last gave: whoever
    leaves this list, or goes down a role, loses what they granted with
    the role they lost."""


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
            PrinterColumn("Instances", ".status.usage.instances.summary"),
            PrinterColumn("Cores", ".status.usage.cores.summary"),
            PrinterColumn("RAM-MiB", ".status.usage.ramMib.summary"),
            PrinterColumn("Volumes", ".status.usage.volumes.summary"),
            PrinterColumn("GiB", ".status.usage.gigabytes.summary"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: ProjectSpec = Field(default_factory=ProjectSpec)
    status: ProjectStatus = Field(default_factory=ProjectStatus)
