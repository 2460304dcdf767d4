"""The compute planner (pure): an instance's resolved intent and this node's
facts -> the GuestPlan the node driver carries out (domain, disks, NICs,
secrets, config drive). No I/O: golden-tested from intent fixtures, as
KubeVirt's converter, with the XML builder (nubes.drivers.compute.domain)
downstream of it."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nubes.api.compute import Instance, IntentNic
from nubes.drivers.compute.configdrive import ConfigDriveSpec, NetworkDataPort
from nubes.drivers.compute.domain import (
    RESCUE_TARGET,
    ChapAuth,
    DataDisk,
    DomainSpec,
    FileDisk,
    IscsiDisk,
    Nic,
    Owner,
)
from nubes.drivers.compute.node import GuestPlan, IscsiSecret, LocalDisk, VifPlug
from nubes.drivers.host import VirtType
from nubes.drivers.images.cache import ImageSource
from nubes.drivers.network.vif import vif_names


@dataclass(frozen=True)
class VolumeDisk:
    """A volume to attach: where it is exported, and its CHAP secret."""

    name: str
    target: str
    host: str
    port: int
    iqn: str
    lun: int
    username: str
    password: str


@dataclass
class Plan:
    """The instance's intent with what the node resolved for it (volume
    exports and their credentials); no API access needed past this point."""

    inst: Instance
    vcpus: int
    ram_mib: int
    disk_bytes: int
    root_source: ImageSource | None
    """Where a missing root disk comes from (image, shelved disk, transfer)."""
    nics: list[IntentNic] = field(default_factory=list)
    """NICs in guest order, as the controller resolved them."""
    volumes: list[VolumeDisk] = field(default_factory=list)
    boot_volume: VolumeDisk | None = None
    """Root disk on a volume (boot from volume) instead of a local overlay."""


@dataclass(frozen=True)
class NodeFacts:
    node: str
    node_tag: str
    """Short digest of the node name, in device and domain names."""
    instances_dir: str
    virt_type: VirtType
    rescue_disk_present: bool = False
    """The rescue disk exists: the node's record of rescue mode."""


DOMAIN_PREFIX = "nubes-"
SECRET_PREFIX = "nubes-volume-"


def domain_name(inst: Instance, node_tag: str) -> str:
    """Per node, so that simulated nodes sharing one libvirtd (tests) never
    touch each other's domains; a real node has its own libvirtd anyway."""
    return f"{DOMAIN_PREFIX}{inst.uid}-{node_tag}"


def domain_uuid(inst: Instance, node: str) -> str:
    return str(uuid.uuid5(uuid.UUID(inst.uid), node))


def instance_dir(facts: NodeFacts, inst: Instance) -> Path:
    return Path(facts.instances_dir) / inst.uid


def secret_prefix(inst: Instance) -> str:
    return f"{SECRET_PREFIX}{inst.uid}-"


def vif_plugs(plan: Plan) -> tuple[VifPlug, ...]:
    """The guest's VIFs in NIC order."""
    return tuple(VifPlug(n.port_uid, n.mac, n.mtu) for n in plan.nics)


def plan_guest(plan: Plan, facts: NodeFacts) -> GuestPlan:
    inst = plan.inst
    directory = instance_dir(facts, inst)
    secrets: list[IscsiSecret] = []

    def iscsi(vol: VolumeDisk) -> IscsiDisk:
        # QEMU's own initiator opens the LUN, its CHAP password in a libvirt secret.
        usage = f"{secret_prefix(inst)}{vol.name}-{facts.node_tag}"
        secrets.append(IscsiSecret(usage, vol.password))
        return IscsiDisk(
            host=vol.host,
            port=vol.port,
            iqn=vol.iqn,
            lun=vol.lun,
            target=vol.target,
            chap=ChapAuth(vol.username, usage),
        )

    local: LocalDisk | None = None
    root: DataDisk
    if plan.boot_volume is not None:
        root = iscsi(plan.boot_volume)
    else:
        local = LocalDisk(str(directory / "disk"), plan.root_source, plan.disk_bytes)
        root = FileDisk(local.path, "vda")
    nics = []
    for nic in plan.nics:
        names = vif_names(nic.port_uid, facts.node_tag)
        nics.append(Nic(bridge=names.qbr, tap=names.tap, mac=nic.mac, mtu=nic.mtu))
    rescue = directory / "rescue.qcow2"
    spec = DomainSpec(
        name=domain_name(inst, facts.node_tag),
        uuid=domain_uuid(inst, facts.node),
        owner=Owner(inst.uid, inst.namespace or "", inst.name),
        vcpus=plan.vcpus,
        memory_mib=plan.ram_mib,
        virt_type=facts.virt_type,
        root_disk=root,
        console_log=str(directory / "console.log"),
        config_drive=str(directory / "config.iso") if inst.spec.config_drive else None,
        data_disks=tuple(iscsi(v) for v in plan.volumes),
        nics=tuple(nics),
        rescue_disk=FileDisk(str(rescue), RESCUE_TARGET) if facts.rescue_disk_present else None,
    )
    return GuestPlan(
        directory=str(directory),
        domain=spec,
        root=local,
        vifs=vif_plugs(plan),
        secrets=tuple(secrets),
        secret_prefix=secret_prefix(inst),
        secret_suffix=f"-{facts.node_tag}",
        config_drive=config_drive(plan) if inst.spec.config_drive else None,
        boot_digest=boot_digest(spec, plan.disk_bytes),
    )


def config_drive(plan: Plan) -> ConfigDriveSpec:
    inst = plan.inst
    return ConfigDriveSpec(
        uuid=inst.uid,
        name=inst.name,
        hostname=inst.spec.hostname or inst.name,
        metadata=dict(inst.spec.metadata),
        user_data=inst.spec.user_data.encode() if inst.spec.user_data else None,
        ports=tuple(
            NetworkDataPort(port_id=n.port_uid, mac=n.mac, mtu=n.mtu, network_id=n.network_uid)
            for n in plan.nics
        ),
        availability_zone=inst.spec.availability_zone,
        project=inst.namespace,
    )


def _identity(disk: DataDisk) -> str:
    if isinstance(disk, IscsiDisk):
        return f"{disk.iqn}/{disk.lun}"
    return disk.path if isinstance(disk, FileDisk) else disk.device


def boot_digest(spec: DomainSpec, disk_bytes: int) -> str:
    """What a running domain cannot change without a restart."""
    parts = [
        spec.vcpus,
        spec.memory_mib,
        _identity(spec.root_disk),
        disk_bytes,
        spec.rescue_disk.path if spec.rescue_disk else None,
        [(n.mac, n.bridge) for n in spec.nics],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
