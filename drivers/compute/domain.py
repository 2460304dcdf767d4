"""DomainSpec -> libvirt domain XML: a pure function, golden-tested.

Everything the node decides about a guest's virtual hardware is here, so the
libvirt driver only defines what this produces. Choices worth knowing:

- Machine `pc` (i440fx) with ACPI and APIC: PCI hotplug of disks on pci.0
  needs ACPI ("Bus 'pci.0' does not support hotplugging" otherwise).
- Every disk is virtio-blk; the config drive is a read-only virtio disk (the
  guest needs no IDE/SATA or CD-ROM drivers). Boot order is per device, so a
  rescue boot puts the rescue disk first and the original root disk second.
- NICs are `type='bridge'` on the port's Linux bridge (hybrid plug, see
  nubes.drivers.network.vif) with the tap name, MAC and MTU the network
  drivers chose.
- The serial console is a pty (`virsh console`) whose output virtlogd also
  appends to a log file the user can read.
- `<metadata>` carries the Nubes instance uid/namespace/name, which is how
  the driver tells its domains from anyone else's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from nubes.drivers.host import VirtType

METADATA_NS = "https://nubes.io/xmlns/libvirt/instance/v1"
METADATA_PREFIX = "nubes"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)

TARGET = re.compile(r"^vd[a-z]{1,2}$")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SERIAL = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")  # virtio-blk serials stop at 20 bytes
CONFIG_DRIVE_TARGET = "vdz"
RESCUE_TARGET = "vdy"
# Data volumes take the slots between the root disk (vda) and the rescue disk.
DATA_TARGETS = tuple(f"vd{c}" for c in "bcdefghijklmnopqrstuvwx")

DiskFormat = Literal["qcow2", "raw"]


class InvalidDomainSpec(ValueError):
    """The spec cannot become a domain; the message names the field."""


@dataclass(frozen=True)
class Owner:
    """The Nubes instance a domain belongs to."""

    uid: str
    namespace: str
    name: str


@dataclass(frozen=True)
class FileDisk:
    """A disk image file (root disks, rescue disks, file volumes)."""

    path: str
    target: str
    format: DiskFormat = "qcow2"
    serial: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class BlockDisk:
    """A host block device (an LVM volume, a local iSCSI session's disk)."""

    device: str
    target: str
    serial: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class ChapAuth:
    username: str
    secret_usage: str
    """Usage name of the libvirt iSCSI secret holding the password
    (LibvirtCompute.ensure_iscsi_secret)."""


@dataclass(frozen=True)
class IscsiDisk:
    """A LUN reached by QEMU's own iSCSI initiator (no host session)."""

    host: str
    iqn: str
    lun: int
    target: str
    port: int = 3260
    chap: ChapAuth | None = None
    serial: str | None = None
    readonly: bool = False


DataDisk = FileDisk | BlockDisk | IscsiDisk


@dataclass(frozen=True)
class Nic:
    bridge: str
    """Linux bridge to plug the tap into (the port's qbr)."""
    tap: str
    """Tap device name libvirt creates."""
    mac: str
    mtu: int = 1500
    model: Literal["virtio"] = "virtio"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    owner: Owner
    vcpus: int
    memory_mib: int
    virt_type: VirtType
    root_disk: DataDisk
    """A file overlay, or a volume (boot from volume)."""
    """Normally target vda, qcow2 overlay on the cached image."""
    console_log: str
    """File the serial console is appended to."""
    config_drive: str | None = None
    """ISO path (nubes.drivers.compute.configdrive), attached read-only as vdz."""
    data_disks: tuple[DataDisk, ...] = ()
    nics: tuple[Nic, ...] = ()
    rescue_disk: FileDisk | None = None
    """When set, boots this first; the root disk stays attached, second."""
    machine: str = "pc"


def _fail(field: str, problem: str) -> InvalidDomainSpec:
    return InvalidDomainSpec(f"{field}: {problem}")


def validate(spec: DomainSpec) -> None:
    """Raise InvalidDomainSpec naming the first bad field."""
    if not NAME.match(spec.name):
        raise _fail("name", f"{spec.name!r} is not a usable domain name")
    if not UUID.match(spec.uuid):
        raise _fail("uuid", f"{spec.uuid!r} is not a lowercase UUID")
    if spec.vcpus < 1:
        raise _fail("vcpus", "must be at least 1")
    if spec.memory_mib < 16:
        raise _fail("memory_mib", "must be at least 16")
    if spec.virt_type not in ("kvm", "qemu"):
        raise _fail("virt_type", f"{spec.virt_type!r} is neither kvm nor qemu")
    targets: list[str] = []
    disks: list[tuple[str, DataDisk]] = [("root_disk", spec.root_disk)]
    if spec.rescue_disk is not None:
        disks.append(("rescue_disk", spec.rescue_disk))
    disks += [(f"data_disks[{i}]", d) for i, d in enumerate(spec.data_disks)]
    for field, disk in disks:
        validate_disk(disk, field)
        targets.append(disk.target)
    if spec.config_drive is not None:
        targets.append(CONFIG_DRIVE_TARGET)
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise _fail("disks", f"target {', '.join(duplicates)} is used twice")
    macs: list[str] = []
    for i, nic in enumerate(spec.nics):
        if not MAC.match(nic.mac):
            raise _fail(f"nics[{i}].mac", f"{nic.mac!r} is not a lowercase MAC address")
        if not IFNAME.match(nic.tap) or nic.tap.startswith(("vnet", "macvtap")):
            raise _fail(f"nics[{i}].tap", f"{nic.tap!r} is not a tap name libvirt accepts")
        if not IFNAME.match(nic.bridge):
            raise _fail(f"nics[{i}].bridge", f"{nic.bridge!r} is not a bridge name")
        if not 68 <= nic.mtu <= 65535:
            raise _fail(f"nics[{i}].mtu", f"{nic.mtu} is out of range")
        macs.append(nic.mac)
    if len(set(macs)) != len(macs):
        raise _fail("nics", "two NICs share a MAC address")


def validate_disk(disk: DataDisk, field: str = "disk") -> None:
    if not TARGET.match(disk.target):
        raise _fail(f"{field}.target", f"{disk.target!r} is not a virtio target (vdX)")
    if disk.serial is not None and not SERIAL.match(disk.serial):
        raise _fail(f"{field}.serial", f"{disk.serial!r} must be 1-20 letters, digits, . _ -")
    if isinstance(disk, FileDisk) and not disk.path.startswith("/"):
        raise _fail(f"{field}.path", f"{disk.path!r} is not absolute")
    if isinstance(disk, BlockDisk) and not disk.device.startswith("/dev/"):
        raise _fail(f"{field}.device", f"{disk.device!r} is not under /dev")
    if isinstance(disk, IscsiDisk):
        if not disk.iqn.startswith("iqn."):
            raise _fail(f"{field}.iqn", f"{disk.iqn!r} is not an IQN")
        if not 0 <= disk.lun <= 16383:
            raise _fail(f"{field}.lun", f"{disk.lun} is out of range")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk_element(disk: DataDisk, boot_order: int | None = None) -> ET.Element:
    if isinstance(disk, FileDisk):
        el = ET.Element("disk", {"type": "file", "device": "disk"})
        driver = {"name": "qemu", "type": disk.format}
        if not disk.readonly:
            driver["discard"] = "unmap"
        _sub(el, "driver", **driver)
        _sub(el, "source", file=disk.path)
    elif isinstance(disk, BlockDisk):
        el = ET.Element("disk", {"type": "block", "device": "disk"})
        _sub(el, "driver", name="qemu", type="raw", cache="none", io="native")
        _sub(el, "source", dev=disk.device)
    else:
        el = ET.Element("disk", {"type": "network", "device": "disk"})
        _sub(el, "driver", name="qemu", type="raw", cache="none")
        source = _sub(el, "source", protocol="iscsi", name=f"{disk.iqn}/{disk.lun}")
        _sub(source, "host", name=disk.host, port=str(disk.port))
        if disk.chap is not None:
            auth = _sub(source, "auth", username=disk.chap.username)
            _sub(auth, "secret", type="iscsi", usage=disk.chap.secret_usage)
    _sub(el, "target", dev=disk.target, bus="virtio")
    if boot_order is not None:
        _sub(el, "boot", order=str(boot_order))
    if disk.readonly:
        _sub(el, "readonly")
    if disk.serial is not None:
        _sub(el, "serial", disk.serial)
    return el


def _nic_element(nic: Nic) -> ET.Element:
    el = ET.Element("interface", {"type": "bridge"})
    _sub(el, "mac", address=nic.mac)
    _sub(el, "source", bridge=nic.bridge)
    _sub(el, "target", dev=nic.tap)
    _sub(el, "model", type=nic.model)
    _sub(el, "mtu", size=str(nic.mtu))
    return el


def _to_xml(el: ET.Element) -> str:
    ET.indent(el, space="  ")
    return ET.tostring(el, encoding="unicode") + "\n"


def disk_xml(disk: DataDisk) -> str:
    """The `<disk>` element for a live attach or detach."""
    validate_disk(disk)
    return _to_xml(_disk_element(disk))


def domain_xml(spec: DomainSpec) -> str:
    validate(spec)
    dom = ET.Element("domain", {"type": spec.virt_type})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    meta = _sub(dom, "metadata")
    ns = f"{{{METADATA_NS}}}"
    instance = _sub(meta, f"{ns}instance")
    _sub(instance, f"{ns}uid", spec.owner.uid)
    _sub(instance, f"{ns}namespace", spec.owner.namespace)
    _sub(instance, f"{ns}name", spec.owner.name)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.virt_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough", check="none")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    if spec.rescue_disk is not None:
        devices.append(_disk_element(spec.rescue_disk, boot_order=1))
        devices.append(_disk_element(spec.root_disk, boot_order=2))
    else:
        devices.append(_disk_element(spec.root_disk, boot_order=1))
    for disk in spec.data_disks:
        devices.append(_disk_element(disk))
    if spec.config_drive is not None:
        devices.append(
            _disk_element(
                FileDisk(spec.config_drive, CONFIG_DRIVE_TARGET, "raw", "config-2", readonly=True)
            )
        )
    for nic in spec.nics:
        devices.append(_nic_element(nic))
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=spec.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    return _to_xml(dom)


def iscsi_secret_xml(usage: str, description: str = "") -> str:
    """A private, persistent libvirt secret for iSCSI CHAP, found by `usage`."""
    secret = ET.Element("secret", {"ephemeral": "no", "private": "yes"})
    if description:
        _sub(secret, "description", description)
    usage_el = _sub(secret, "usage", type="iscsi")
    _sub(usage_el, "target", usage)
    return _to_xml(secret)


def instance_domain_name(uid: str) -> str:
    """The domain name the agent gives an instance: stable and unique per node."""
    return f"nubes-{uid}"
