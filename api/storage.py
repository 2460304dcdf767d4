"""storage.nubes.io: Cinder volume types, volumes, snapshots and backups."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from .meta import (
    AGE_COLUMN,
    CATEGORY,
    READY_COLUMN,
    REASON_COLUMN,
    ApiModel,
    CrdInfo,
    Immutable,
    NodeProblem,
    PrinterColumn,
    ProjectRef,
    Resource,
    Rule,
    Status,
    cel,
    validations,
)

GROUP = "storage.nubes.io"
CATEGORIES = (CATEGORY, "cinder")

# Finalizers, part of the contract between the tiers: the controller drops
# its own once deletion is allowed; then the storage node's agent removes the
# data (secure wipe) and drops AGENT_FINALIZER.
VOLUME_FINALIZER = "storage.nubes.io/volume"
SNAPSHOT_FINALIZER = "storage.nubes.io/snapshot"
BACKUP_FINALIZER = "storage.nubes.io/backup"
AGENT_FINALIZER = "storage.nubes.io/agent"


class VolumeTypeSpec(ApiModel):
    """A class of volumes: which backend and which capabilities."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!self.isPublic || !has(self.projects) || size(self.projects) == 0",
                "projects is the access list of a non-public volume type; a public type is"
                " usable by every project",
                field_path=".projects",
            )
        )
    )

    backend_name: str | None = Field(default=None, max_length=255)
    """`volume_backend_name`: only pools of this backend qualify."""
    extra_specs: dict[str, Annotated[str, Field(max_length=255)]] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": 64}
    )
    """Capabilities pools must report, e.g. `thin_provisioning_support: "<is> True"`."""
    is_public: bool = True
    """Usable by every project. A non-public type is usable only by the
    projects in `projects` (Cinder's volume-type-access); volumes of other
    projects are refused with reason VolumeTypeNotAccessible. Its name stays
    listable by every user (Kubernetes RBAC cannot hide single objects)."""
    projects: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=1024, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Names of the Projects that may use this non-public type (volume-type-access)."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class VolumeType(Resource[VolumeTypeSpec, Status]):
    crd = CrdInfo(
        group=GROUP,
        kind="VolumeType",
        plural="volumetypes",
        short_names=("vt", "voltype"),
        categories=CATEGORIES,
        scope="Cluster",
        description="A Cinder volume type: backend and capability requirements.",
        printer_columns=(
            PrinterColumn("Backend", ".spec.backendName"),
            PrinterColumn("Public", ".spec.isPublic", "boolean"),
            AGE_COLUMN,
        ),
    )
    spec: VolumeTypeSpec = Field(default_factory=VolumeTypeSpec)
    status: Status = Field(default_factory=Status)


class VolumeSource(ApiModel):
    """What a new volume is filled from; absent means blank."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.image) ? 1 : 0) + (has(self.snapshot) ? 1 : 0)"
                " + (has(self.volume) ? 1 : 0) + (has(self.backup) ? 1 : 0) == 1",
                "source needs exactly one of image, snapshot, volume or backup",
            )
        )
    )

    image: ProjectRef | None = None
    """Copy an image into the volume."""
    snapshot: str | None = Field(default=None, max_length=253)
    """Create from a VolumeSnapshot in the same namespace."""
    volume: str | None = Field(default=None, max_length=253)
    """Clone another Volume in the same namespace."""
    backup: str | None = Field(default=None, max_length=253)
    """Restore a VolumeBackup in the same namespace."""


class VolumeSpec(ApiModel):
    """A block device."""

    size_gib: Annotated[
        int,
        Field(ge=1, le=65536),
        Rule("self >= oldSelf", "sizeGib can only grow: a volume is extended, never shrunk"),
    ]
    """Size in GiB. Raising it extends the volume (only while detached)."""
    volume_type: Annotated[str | None, Field(max_length=253), Immutable("volumeType")] = None
    """VolumeType name; absent means the default type."""
    availability_zone: Annotated[
        str | None, Field(max_length=255), Immutable("availabilityZone")
    ] = None
    """Only pools in this zone qualify."""
    source: Annotated[VolumeSource | None, Immutable("source")] = None
    """Initial contents."""
    bootable: bool = False
    """Instances may boot from this volume."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class VolumeAttachmentStatus(ApiModel):
    """Written by the controller: which instance may use the volume."""

    instance: str
    """Instance name (same namespace)."""
    instance_uid: str
    """Uid of that instance."""
    node: str | None = None
    """Compute node of the instance; the export admits only this initiator."""
    boot: bool = False
    """Attached as the instance's root disk."""


class VolumeBacking(ApiModel):
    """Written by the storage node's agent: the volume as it exists there."""

    node: str
    """Storage node holding the data."""
    size_gib: int
    """Size the backend has provisioned."""
    source_done: bool = True
    """The initial contents (image, snapshot, clone, backup) are in place."""


class VolumeExport(ApiModel):
    """Written by the storage node's agent while the volume is attached."""

    portal: str
    """iSCSI portal, host:port."""
    iqn: str
    """Target IQN; the volume is LUN `lun` of it."""
    lun: int = 1
    """LUN number."""
    chap_secret: str
    """Secret with `username` and `password` for CHAP, in the components'
    namespace (the agents' --secret-namespace), which tenants cannot read."""
    initiator_node: str | None = None
    """Node whose initiator the target admits."""


class VolumeStatus(Status):
    backend: str | None = None
    """Backend holding the volume (controller)."""
    node: str | None = None
    """Storage node the scheduler chose (controller)."""
    pool: str | None = None
    """Pool on that node (controller)."""
    attachment: VolumeAttachmentStatus | None = None
    """Where it is attached (controller)."""
    bootable: bool | None = None
    """Bootable flag in effect (controller)."""
    granted_size_gib: int | None = None
    """Size the project's gigabytes quota holds for the volume (controller); the
    storage agent creates and extends the volume up to it, never beyond."""
    backing: VolumeBacking | None = None
    """The data on the storage node (storage agent)."""
    export: VolumeExport | None = None
    """iSCSI export for the attached instance (storage agent)."""
    node_problem: NodeProblem | None = None
    """Why the storage agent is stuck, if it is (storage agent)."""


class Volume(Resource[VolumeSpec, VolumeStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Volume",
        selectable_fields=(".status.node", ".status.attachment.node"),
        plural="volumes",
        short_names=("vol",),
        categories=CATEGORIES,
        description="A Cinder volume: a block device on a storage backend.",
        printer_columns=(
            PrinterColumn("Size-GiB", ".spec.sizeGib", "integer"),
            PrinterColumn("Type", ".spec.volumeType"),
            PrinterColumn("Node", ".status.node"),
            PrinterColumn("Attached-To", ".status.attachment.instance"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: VolumeSpec
    status: VolumeStatus = Field(default_factory=VolumeStatus)


class VolumeSnapshotSpec(ApiModel):
    """A point-in-time copy of a volume, kept on its backend."""

    volume: Annotated[str, Field(min_length=1, max_length=253), Immutable("volume")]
    """Volume name in the same namespace."""
    force: bool = False
    """Snapshot even while attached (data may be inconsistent)."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class VolumeSnapshotStatus(Status):
    node: str | None = None
    """Storage node (controller: the volume's)."""
    size_gib: int | None = Field(default=None)
    """Size of the source volume when taken (storage agent, once taken)."""
    node_problem: NodeProblem | None = None
    """Why the storage agent is stuck, if it is (storage agent)."""


class VolumeSnapshot(Resource[VolumeSnapshotSpec, VolumeSnapshotStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="VolumeSnapshot",
        selectable_fields=(".status.node",),
        plural="volumesnapshots",
        short_names=("vsnap", "volsnap"),
        categories=CATEGORIES,
        description="A Cinder snapshot of a volume.",
        printer_columns=(
            PrinterColumn("Volume", ".spec.volume"),
            PrinterColumn("Size-GiB", ".status.sizeGib", "integer"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: VolumeSnapshotSpec
    status: VolumeSnapshotStatus = Field(default_factory=VolumeSnapshotStatus)


class VolumeBackupSpec(ApiModel):
    """A copy of a volume in the backup store, independent of the volume."""

    model_config = ConfigDict(
        json_schema_extra=validations(cel("self == oldSelf", "a VolumeBackup is immutable"))
    )

    volume: str = Field(min_length=1, max_length=253)
    """Volume name in the same namespace."""
    incremental: bool = False
    """Store only chunks changed since the latest backup of the volume."""
    force: bool = False
    """Back up even while attached."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class VolumeBackupStatus(Status):
    node: str | None = None
    """Node that takes the backup (controller: the volume's storage node)."""
    volume_uid: str | None = None
    """Uid of the volume backed up (controller); the backup outlives it."""
    parent: str | None = None
    """Backup this incremental one builds on (controller)."""
    size_gib: int | None = Field(default=None)
    """Size of the volume backed up (storage agent, like the fields below)."""
    container: str | None = None
    """Directory in the backup store."""
    chunks: int | None = None
    """Chunks in the backup."""
    chunks_stored: int | None = None
    """Chunks this backup wrote (fewer than chunks when incremental)."""
    stored_bytes: int | None = None
    """Compressed bytes this backup wrote."""
    node_problem: NodeProblem | None = None
    """Why the storage agent is stuck, if it is (storage agent)."""


class VolumeBackup(Resource[VolumeBackupSpec, VolumeBackupStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="VolumeBackup",
        selectable_fields=(".status.node",),
        plural="volumebackups",
        short_names=("vbak", "volbackup"),
        categories=CATEGORIES,
        description="A Cinder backup: compressed, checksummed chunks in the backup store.",
        printer_columns=(
            PrinterColumn("Volume", ".spec.volume"),
            PrinterColumn("Incremental", ".spec.incremental", "boolean"),
            PrinterColumn("Size-GiB", ".status.sizeGib", "integer"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: VolumeBackupSpec
    status: VolumeBackupStatus = Field(default_factory=VolumeBackupStatus)
