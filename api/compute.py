"""compute.nubes.io: flavors, instances, hypervisors and instance actions (Nova).

(About 580 lines: the Nova kinds' models and their CRD documentation, which
reference one another.)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .meta import (
    AGE_COLUMN,
    CATEGORY,
    READY_COLUMN,
    REASON_COLUMN,
    ApiModel,
    CrdInfo,
    Immutable,
    LocalRef,
    NodeProblem,
    PrinterColumn,
    ProjectRef,
    Resource,
    Rule,
    Status,
    cel,
    validations,
)

GROUP = "compute.nubes.io"
CATEGORIES = (CATEGORY, "nova")

PowerState = Literal["Running", "Stopped", "Paused", "Suspended", "Shelved"]


# --- Flavor ------------------------------------------------------------------

_FLAVOR_IMMUTABLE = ("vcpus", "ramMib", "diskGib", "ephemeralGib", "isPublic", "description")


class FlavorSpec(ApiModel):
    """An instance size, immutable as in Nova except its access list `projects`."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                " && ".join(f"self.{f} == oldSelf.{f}" for f in _FLAVOR_IMMUTABLE)
                + " && (has(self.extraSpecs) ? self.extraSpecs : {})"
                " == (has(oldSelf.extraSpecs) ? oldSelf.extraSpecs : {})",
                "a flavor is immutable except its projects access list",
            ),
            cel(
                "!self.isPublic || !has(self.projects) || size(self.projects) == 0",
                "projects is the access list of a non-public flavor; a public flavor is"
                " usable by every project",
                field_path=".projects",
            ),
        )
    )

    vcpus: int = Field(ge=1, le=1024)
    """Virtual CPUs."""
    ram_mib: int = Field(ge=64, le=4194304)
    """RAM in MiB."""
    disk_gib: int = Field(default=0, ge=0, le=65536)
    """Root disk size in GiB; 0 means the image's virtual size."""
    ephemeral_gib: int = Field(default=0, ge=0, le=65536)
    """Extra ephemeral disk in GiB."""
    extra_specs: dict[str, Annotated[str, Field(max_length=255)]] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": 64}
    )
    """Scheduler and hypervisor hints, e.g. `aggregate_instance_extra_specs:ssd`."""
    is_public: bool = True
    """Usable by every project. A non-public flavor is usable only by the
    projects in `projects` (Nova's flavor-access); instances of other projects
    are refused with reason FlavorNotAccessible. Its name stays listable by
    every user (Kubernetes RBAC cannot hide single objects)."""
    projects: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=1024, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Names of the Projects that may use this non-public flavor (flavor-access);
    the only field that may change after creation."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class Flavor(Resource[FlavorSpec, Status]):
    crd = CrdInfo(
        group=GROUP,
        kind="Flavor",
        plural="flavors",
        short_names=("flv",),
        categories=CATEGORIES,
        scope="Cluster",
        description="A Nova flavor: vCPUs, RAM and disk of an instance.",
        printer_columns=(
            PrinterColumn("vCPUs", ".spec.vcpus", "integer"),
            PrinterColumn("RAM-MiB", ".spec.ramMib", "integer"),
            PrinterColumn("Disk-GiB", ".spec.diskGib", "integer"),
            PrinterColumn("Public", ".spec.isPublic", "boolean", priority=1),
            AGE_COLUMN,
        ),
    )
    spec: FlavorSpec
    status: Status = Field(default_factory=Status)


# --- Instance ------------------------------------------------------------------


class InstanceNetwork(ApiModel):
    """A NIC: on a network (a port is created) or on an existing port."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.network) != has(self.port)",
                "a networks entry needs exactly one of network or port",
            ),
            cel(
                "!has(self.fixedIp) || has(self.network)",
                "fixedIp goes with network, not with port",
                field_path=".fixedIp",
            ),
        )
    )

    network: ProjectRef | None = None
    """Network to create a port on (own, shared or external)."""
    port: str | None = Field(default=None, max_length=253)
    """Existing Port in the instance's namespace."""
    fixed_ip: Annotated[
        str | None, Field(max_length=45), Rule("isIP(self)", "fixedIp must be an IP address")
    ] = None
    """Requested address for the created port."""


class VolumeAttachment(ApiModel):
    """A volume attached to the instance."""

    volume: str = Field(min_length=1, max_length=253)
    """Volume name in the instance's namespace."""


class InstanceSpec(ApiModel):
    """A virtual machine."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.image) != has(self.bootVolume)",
                "exactly one of image or bootVolume is required",
            ),
            cel(
                "!has(self.lockReason) || self.locked",
                "lockReason needs locked: true",
                field_path=".lockReason",
            ),
            cel(
                "!has(self.lockedBy) || self.locked",
                "lockedBy needs locked: true",
                field_path=".lockedBy",
            ),
            cel(
                "has(self.image) == has(oldSelf.image)"
                " && has(self.bootVolume) == has(oldSelf.bootVolume)",
                "the boot source is immutable; rebuild with an InstanceAction",
            ),
        )
    )

    flavor: Annotated[
        str,
        Field(min_length=1, max_length=253),
        Rule("self == oldSelf", "flavor is immutable; resize with an InstanceAction"),
    ]
    """Flavor name. Later changes go through a Resize action."""
    image: Annotated[
        ProjectRef | None,
        Rule("self == oldSelf", "image is immutable; rebuild with an InstanceAction"),
    ] = None
    """Image to boot from (own, shared or public)."""
    boot_volume: Annotated[LocalRef | None, Immutable("bootVolume")] = None
    """Bootable Volume to boot from instead of an image."""
    networks: list[InstanceNetwork] = Field(default_factory=list, max_length=16)
    """NICs in order."""
    security_groups: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        default=None, max_length=32
    )
    """SecurityGroups for created ports; absent means the project's default."""
    volumes: list[VolumeAttachment] = Field(default_factory=list, max_length=26)
    """Data volumes to attach (hot-plugged while running)."""
    user_data: str | None = Field(default=None, max_length=65536)
    """User data passed on the config drive."""
    config_drive: bool = True
    """Attach a config drive with metadata and user data."""
    hostname: str | None = Field(
        default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    """Guest hostname; defaults to the instance name."""
    availability_zone: Annotated[
        str | None, Field(max_length=255), Immutable("availabilityZone")
    ] = None
    """Only schedule to nodes of this zone."""
    power_state: PowerState = "Running"
    """Desired power state: Running, Stopped, Paused (kept in memory),
    Suspended (saved to disk) or Shelved (disk kept, node resources freed)."""
    locked: bool = False
    """A locked instance refuses changes from non-admin users."""
    lock_reason: str | None = Field(default=None, max_length=255)
    """Why it is locked."""
    locked_by: Literal["owner", "admin"] | None = None
    """Whose lock it is: `owner` (unset means the same) may be lifted by any
    member; `admin`, set only by an admin (verb override-lock), is lifted only
    by one, as Nova's admin lock."""
    # Keys and values at most 255 characters, as in Nova: they are written to
    # the config drive on the node.
    metadata: Annotated[
        dict[str, Annotated[str, Field(max_length=255)]],
        Rule(
            "self.all(k, size(k) >= 1 && size(k) <= 255)",
            "metadata keys must be 1 to 255 characters long",
        ),
    ] = Field(default_factory=dict, json_schema_extra={"maxProperties": 128})
    """Key/value metadata, also on the config drive (keys and values at most
    255 characters)."""


class InstanceAddress(ApiModel):
    network: str
    """Network name."""
    port: str
    """Port name."""
    mac_address: str = ""
    """MAC of the NIC."""
    ip_addresses: list[str] = Field(default_factory=list)
    """Fixed addresses."""
    floating_ip_addresses: list[str] = Field(default_factory=list)
    """Floating IPs in force for this NIC (reachable from their external network)."""


class DiskTransfer(ApiModel):
    """A root disk flattened into the image store, to be booted elsewhere."""

    ref: str
    """Store-internal reference (snapshots/UID.qcow2, transfers/UID.qcow2,
    shelved/UID.qcow2), or volume:NAME for a volume-backed root disk. Written
    by node agents only; never a path or URL."""
    sha256: str
    """SHA-256 of the file."""


STORE_REF = r"^([0-9a-f][0-9a-f-]{0,63}|(transfers|shelved)/[0-9a-f][0-9a-f-]{0,63}\.qcow2)$"


class StoreSource(ApiModel):
    """Data in the image store a node copies, resolved by the controller."""

    ref: str = Field(pattern=STORE_REF)
    """An imported image's uid, or a store-internal reference (shelved/UID.qcow2,
    transfers/UID.qcow2). Never a path or URL."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 the node verifies."""
    format: Literal["raw", "qcow2"]
    """Disk format of the data."""


class IntentNic(ApiModel):
    """One NIC, in guest order."""

    port: str
    """Port name."""
    port_uid: str
    """Port uid (names the node's VIF devices)."""
    mac: str
    """MAC address."""
    mtu: int
    """MTU of the port's network."""
    network_uid: str = ""
    """Network uid (config drive network data)."""


class IntentVolume(ApiModel):
    volume: str
    """Volume name; its export (status.export) says where the node reads it."""
    target: str
    """Guest device (vda for a boot volume, vdb... for data volumes)."""


class NodeIntent(ApiModel):
    """Everything a node needs to run the instance, resolved by the controller
    (flavor, image, actions applied): the agent reads this and its own node
    facts, never Flavors, Images or the controller's reasoning."""

    vcpus: int
    ram_mib: int
    disk_bytes: int
    """Root disk size (0: the image's own size)."""
    root: StoreSource | None = None
    """Where a missing local root disk comes from: the image, or the shelved disk."""
    boot_volume: IntentVolume | None = None
    """Root disk on a volume instead of a local overlay."""
    rescued: bool = False
    nics: list[IntentNic] = Field(default_factory=list)
    volumes: list[IntentVolume] = Field(default_factory=list)
    """Data volumes attached to this instance, in device order."""
    basis: str = ""
    """completedAt of the last finished InstanceAction this intent accounts
    for: a node that sees a later one waits for the next intent."""


class InstanceStatus(Status):
    # Written by the controller:
    intent: NodeIntent | None = None
    """What the node runs (controller; read by the node agent)."""
    node: str | None = None
    """Node the instance runs on (changes with Migrate and Resize)."""
    node_since: str | None = None
    """When the instance was placed on that node (scheduling or a move)."""
    incoming_node: str | None = None
    """Target node of a Migrate or Resize under way (the target's agent
    builds the instance there before status.node names it)."""
    flavor: str | None = None
    """Flavor in effect (changes with Resize)."""
    image: str | None = None
    """Image in effect, as namespace/name (changes with Rebuild)."""
    vcpus: int | None = None
    """vCPUs in effect."""
    ram_mib: int | None = None
    """RAM in effect."""
    disk_gib: int | None = None
    """Root disk size in effect."""
    addresses: list[InstanceAddress] = Field(default_factory=list)
    """NICs and their addresses."""
    rescued: bool | None = None
    """Booted from a rescue image (after Rescue, until Unrescue)."""
    # Written by the node agent:
    power_state: str | None = None
    """Power state observed in the hypervisor."""
    domain: str | None = None
    """libvirt domain name."""
    attached_volumes: list[str] = Field(default_factory=list)
    """Volumes attached right now."""
    console_log: str | None = None
    """ConfigMap holding the tail of the serial console."""
    shelved_disk: DiskTransfer | None = None
    """Root disk kept in the image store while shelved."""
    node_problem: NodeProblem | None = None
    """Why the node agent does not bring the instance to its power state, if
    it does not (e.g. PortBindingTimeout: a port is not bound on the node, so
    the guest is not started; ImageFetchFailed: the image is not in the
    store)."""


class Instance(Resource[InstanceSpec, InstanceStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Instance",
        selectable_fields=(".status.node", ".status.incomingNode"),
        plural="instances",
        short_names=("inst", "vm", "server"),
        categories=CATEGORIES,
        description="A Nova instance (server): a virtual machine on a node.",
        printer_columns=(
            PrinterColumn("Flavor", ".status.flavor"),
            PrinterColumn("Node", ".status.node"),
            PrinterColumn("Power", ".status.powerState"),
            PrinterColumn("Addresses", ".status.addresses[*].ipAddresses[*]"),
            PrinterColumn("Floating", ".status.addresses[*].floatingIpAddresses[*]"),
            PrinterColumn("Locked", ".spec.locked", "boolean", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: InstanceSpec
    status: InstanceStatus = Field(default_factory=InstanceStatus)


# --- InstanceAction ------------------------------------------------------------

ActionType = Literal[
    "SoftReboot", "HardReboot", "Snapshot", "Rebuild", "Resize", "Rescue", "Unrescue", "Migrate"
]


class InstanceActionSpec(ApiModel):
    """A one-shot operation on an instance, kept as a record with its outcome."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self == oldSelf", "an InstanceAction is immutable; create a new one"),
            cel(
                "self.action != 'Snapshot' || has(self.imageName)",
                "Snapshot needs imageName",
                field_path=".imageName",
            ),
            cel(
                "self.action != 'Rebuild' || has(self.image)",
                "Rebuild needs image",
                field_path=".image",
            ),
            cel(
                "self.action != 'Resize' || has(self.flavor)",
                "Resize needs flavor",
                field_path=".flavor",
            ),
            cel(
                "!has(self.targetNode) || self.action == 'Migrate'",
                "targetNode is only for Migrate",
                field_path=".targetNode",
            ),
        )
    )

    instance: str = Field(min_length=1, max_length=253)
    """Instance name in the same namespace."""
    action: ActionType
    """SoftReboot (ACPI), HardReboot (power cycle), Snapshot (root disk to a
    new Image), Rebuild (re-image the root disk), Resize (new flavor), Rescue
    (boot a rescue image with the root disk attached), Unrescue, Migrate
    (cold migration to another node)."""
    image_name: str | None = Field(
        default=None, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """Snapshot: name of the Image to create."""
    image: ProjectRef | None = None
    """Rebuild or Rescue: image to use."""
    flavor: str | None = Field(default=None, max_length=253)
    """Resize: the new flavor."""
    target_node: str | None = Field(default=None, max_length=253)
    """Migrate: a specific node; otherwise the scheduler picks another node.
    Cloud admins only (verb `target-node` on instanceactions), as in Nova."""


class ActionError(ApiModel):
    reason: str
    """CamelCase reason."""
    message: str
    """What went wrong."""


class ActionResources(ApiModel):
    vcpus: int
    ram_mib: int
    disk_bytes: int


class InstanceActionStatus(Status):
    # Written by the controller:
    source_node: str | None = None
    """Node the instance was on when the action was accepted."""
    target_node: str | None = None
    """Node the instance ends up on (Migrate, Resize)."""
    flavor: str | None = None
    """Resize: the new flavor, validated."""
    image: str | None = None
    """Rebuild/Rescue: the image to use, as namespace/name, validated."""
    image_source: StoreSource | None = None
    """Rebuild/Rescue: that image's data in the store."""
    resources: ActionResources | None = None
    """Resize: what the new flavor gives the instance."""
    # Written by the source node's agent:
    started_at: str | None = None
    """When the agent began."""
    transfer: DiskTransfer | None = None
    """Snapshot, Migrate, Resize to another node: the flattened root disk."""
    # Written by the agent that finishes the action (the target node's for moves):
    completed_at: str | None = None
    """When it finished (either way)."""
    result: str | None = None
    """What came out, e.g. the snapshot Image name."""
    error: ActionError | None = None
    """Why it failed."""


class InstanceAction(Resource[InstanceActionSpec, InstanceActionStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="InstanceAction",
        selectable_fields=(".status.sourceNode", ".status.targetNode"),
        plural="instanceactions",
        short_names=("ia", "action"),
        categories=CATEGORIES,
        description="A one-shot instance operation (reboot, snapshot, resize...) and its outcome.",
        printer_columns=(
            PrinterColumn("Instance", ".spec.instance"),
            PrinterColumn("Action", ".spec.action"),
            PrinterColumn("Result", ".status.result", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: InstanceActionSpec
    status: InstanceActionStatus = Field(default_factory=InstanceActionStatus)


# --- Hypervisor (node inventory) -------------------------------------------------


class HypervisorSpec(ApiModel):
    """Operator settings for a compute node. The agent creates the object with
    defaults on first start; operators edit it afterwards."""

    availability_zone: str = Field(default="nova", max_length=255)
    """Availability zone of the node."""
    disabled: bool = False
    """Disabled nodes take no new instances."""
    cpu_allocation_ratio: float = Field(default=16.0, gt=0, le=64)
    """vCPU overcommit."""
    ram_allocation_ratio: float = Field(default=1.5, gt=0, le=16)
    """RAM overcommit."""
    disk_allocation_ratio: float = Field(default=1.0, gt=0, le=16)
    """Disk overcommit."""
    reserved_ram_mib: int = Field(default=512, ge=0)
    """RAM kept for the host."""
    traits: list[Annotated[str, Field(max_length=255)]] = Field(default_factory=list, max_length=64)
    """Capabilities matched by flavor extra specs `trait:NAME=required`."""


class StoragePool(ApiModel):
    """A volume pool on the node, as its agent reports it (Cinder's
    get_volume_stats)."""

    backend: str
    """volume_backend_name."""
    pool: str
    """Pool name."""
    total_gib: int
    """Capacity."""
    free_gib: int
    """Unused capacity."""
    provisioned_gib: int
    """Sum of volume sizes (thin pools may exceed total)."""
    max_over_subscription_ratio: float = 1.0
    """How far provisioned may exceed total."""
    capabilities: dict[str, str] = Field(default_factory=dict)
    """Capabilities matched by volume type extra specs, e.g. thin_provisioning_support."""


class TeardownReport(ApiModel):
    """A node agent's answer to an uninstall's teardown request (the
    nubes.io/teardown annotation on its Hypervisor, set by the chart's
    pre-delete hook)."""

    request: str
    """The annotation's value this answers."""
    state: Literal["Done", "Blocked"]
    """Done: the agent removed what it made on the host and stays idle.
    Blocked: objects still use the node; nothing was removed."""
    message: str = ""
    """What was removed, or which objects block."""


class HypervisorStatus(Status):
    hypervisor_type: str | None = None
    """QEMU."""
    hypervisor_version: str | None = None
    """QEMU version."""
    libvirt_version: str | None = None
    """libvirt version."""
    virt_type: Literal["kvm", "qemu"] | None = None
    """kvm when hardware acceleration works, qemu (TCG) otherwise."""
    host_ip: str | None = None
    """Tunnel endpoint address."""
    vcpus: int | None = None
    """Physical CPUs."""
    ram_mib: int | None = None
    """Physical RAM."""
    disk_gib: int | None = None
    """Instance storage."""
    vcpus_used: int | None = None
    """vCPUs of instances on the node."""
    ram_mib_used: int | None = None
    """RAM of instances on the node."""
    disk_gib_used: int | None = None
    """Disk of instances on the node."""
    running_vms: int | None = None
    """Domains running."""
    heartbeat_time: str | None = None
    """Last agent heartbeat."""
    storage_pools: list[StoragePool] = Field(default_factory=list)
    """Volume pools this node serves."""
    iscsi_portal: str | None = None
    """host:port of this node's iSCSI target."""
    l3_agent: bool | None = None
    """The node hosts routers (agent flag --l3), as Neutron's L3 agents."""
    teardown: TeardownReport | None = None
    """The agent's answer to an uninstall's teardown request."""


class Hypervisor(Resource[HypervisorSpec, HypervisorStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Hypervisor",
        plural="hypervisors",
        short_names=("hv", "hyp"),
        categories=CATEGORIES,
        scope="Cluster",
        description="A compute node as its agent reports it (openstack hypervisor list).",
        printer_columns=(
            PrinterColumn("Type", ".status.hypervisorType"),
            PrinterColumn("Virt", ".status.virtType"),
            PrinterColumn("Zone", ".spec.availabilityZone"),
            PrinterColumn("Host-IP", ".status.hostIp", priority=1),
            PrinterColumn("vCPUs-Used", ".status.vcpusUsed", "integer"),
            PrinterColumn("vCPUs", ".status.vcpus", "integer"),
            PrinterColumn("RAM-Used", ".status.ramMibUsed", "integer"),
            PrinterColumn("RAM", ".status.ramMib", "integer"),
            PrinterColumn("VMs", ".status.runningVms", "integer", priority=1),
            PrinterColumn("Heartbeat", ".status.heartbeatTime", "date", priority=1),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: HypervisorSpec = Field(default_factory=HypervisorSpec)
    status: HypervisorStatus = Field(default_factory=HypervisorStatus)
