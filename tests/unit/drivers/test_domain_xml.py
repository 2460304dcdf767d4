"""DomainSpec -> libvirt XML, against golden files in tests/unit/golden/.

A change to the generated XML fails here until the golden files are
regenerated on purpose and the diff reviewed:

    NUBES_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/drivers/test_domain_xml.py
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nubes.drivers.compute.domain import (
    METADATA_NS,
    BlockDisk,
    ChapAuth,
    DomainSpec,
    FileDisk,
    InvalidDomainSpec,
    IscsiDisk,
    Nic,
    Owner,
    disk_xml,
    domain_xml,
    instance_domain_name,
    iscsi_secret_xml,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("NUBES_UPDATE_GOLDEN") == "1"

UID = "0b6c2f0e-3c1d-4e8e-9d7a-2f1e5a6b7c8d"
INSTANCE = "/var/lib/nubes/instances/" + UID

MINIMAL = DomainSpec(
    name=instance_domain_name(UID),
    uuid=UID,
    owner=Owner(UID, "demo", "web-1"),
    vcpus=1,
    memory_mib=256,
    virt_type="qemu",
    root_disk=FileDisk(f"{INSTANCE}/disk", "vda"),
    console_log=f"{INSTANCE}/console.log",
)

FULL = dataclasses.replace(
    MINIMAL,
    vcpus=4,
    memory_mib=2048,
    virt_type="kvm",
    config_drive=f"{INSTANCE}/config.iso",
    data_disks=(
        FileDisk("/var/lib/nubes/volumes/vol-a", "vdb", "raw", serial="vol-a"),
        BlockDisk("/dev/nubes/vol-b", "vdc", serial="vol-b"),
        IscsiDisk(
            host="192.0.2.10",
            iqn="iqn.2010-10.io.nubes:vol-c",
            lun=1,
            target="vdd",
            chap=ChapAuth("nubes-vol-c", "nubes-chap-vol-c"),
            serial="vol-c",
        ),
        IscsiDisk(
            host="192.0.2.11",
            port=3261,
            iqn="iqn.2010-10.io.nubes:ro",
            lun=0,
            target="vde",
            readonly=True,
        ),
    ),
    nics=(
        Nic("qbr1a2b3c4d5e6", "tap1a2b3c4d5e6", "fa:16:3e:00:00:01", 1450),
        Nic("qbr9f8e7d6c5b4", "tap9f8e7d6c5b4", "fa:16:3e:00:00:02"),
    ),
)

RESCUE = dataclasses.replace(
    MINIMAL,
    root_disk=FileDisk(f"{INSTANCE}/disk", "vdb"),
    rescue_disk=FileDisk(f"{INSTANCE}/disk.rescue", "vda"),
    config_drive=f"{INSTANCE}/config.iso",
)

CASES = {"minimal-tcg": MINIMAL, "full-kvm": FULL, "rescue": RESCUE}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with NUBES_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"generated XML drifted from {path}; if intended, regenerate with"
        " NUBES_UPDATE_GOLDEN=1 and review the diff"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_xml_matches_golden(case: str) -> None:
    check_golden(f"domain-{case}.xml", domain_xml(CASES[case]))


def test_hotplug_disk_and_secret_xml_match_golden() -> None:
    disk = FULL.data_disks[2]
    check_golden("disk-iscsi-chap.xml", disk_xml(disk))
    check_golden("secret-iscsi.xml", iscsi_secret_xml("nubes-chap-vol-c", "CHAP for vol-c"))


def test_domain_xml_is_deterministic() -> None:
    assert domain_xml(FULL) == domain_xml(dataclasses.replace(FULL))


def test_metadata_carries_the_owner() -> None:
    root = ET.fromstring(domain_xml(FULL))
    ns = {"n": METADATA_NS}
    owner = root.find("./metadata/n:instance", ns)
    assert owner is not None
    assert [owner.findtext(f"n:{k}", namespaces=ns) for k in ("uid", "namespace", "name")] == [
        UID,
        "demo",
        "web-1",
    ]


def test_virt_type_decides_domain_type_and_cpu() -> None:
    tcg = ET.fromstring(domain_xml(MINIMAL))
    kvm = ET.fromstring(domain_xml(FULL))
    assert (tcg.get("type"), tcg.find("cpu")) == ("qemu", None)
    cpu = kvm.find("cpu")
    assert kvm.get("type") == "kvm" and cpu is not None and cpu.get("mode") == "host-passthrough"
    for root in (tcg, kvm):
        assert root.find("./features/acpi") is not None  # hotplug needs it


def test_rescue_boots_the_rescue_disk_first() -> None:
    root = ET.fromstring(domain_xml(RESCUE))
    order = {
        d.find("source").get("file"): d.find("boot").get("order")  # type: ignore[union-attr]
        for d in root.findall("./devices/disk")
        if d.find("boot") is not None
    }
    assert order == {f"{INSTANCE}/disk.rescue": "1", f"{INSTANCE}/disk": "2"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"uuid": "NOT-A-UUID"}, "uuid"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"root_disk": FileDisk("relative/disk", "vda")}, "root_disk.path"),
        ({"root_disk": FileDisk("/d", "sda")}, "root_disk.target"),
        ({"data_disks": (FileDisk("/v", "vda"),)}, "target vda is used twice"),
        ({"data_disks": (FileDisk("/v", "vdz"),), "config_drive": "/c.iso"}, "vdz"),
        ({"data_disks": (BlockDisk("/tmp/x", "vdb"),)}, "data_disks[0].device"),
        ({"data_disks": (IscsiDisk("h", "nope", 1, "vdb"),)}, "data_disks[0].iqn"),
        ({"data_disks": (FileDisk("/v", "vdb", serial="x" * 21),)}, "data_disks[0].serial"),
        ({"nics": (Nic("br", "vnet0", "fa:16:3e:00:00:01"),)}, "nics[0].tap"),
        ({"nics": (Nic("br", "tap0", "FA:16:3E:00:00:01"),)}, "nics[0].mac"),
        ({"nics": (Nic("br", "tap0", "fa:16:3e:00:00:01", 20),)}, "nics[0].mtu"),
        (
            {
                "nics": (
                    Nic("br", "tap0", "fa:16:3e:00:00:01"),
                    Nic("br", "tap1", "fa:16:3e:00:00:01"),
                )
            },
            "share a MAC",
        ),
    ],
)
def test_invalid_specs_name_the_field(change: dict[str, object], field: str) -> None:
    spec = dataclasses.replace(MINIMAL, **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidDomainSpec, match=field.replace("[", r"\[").replace("]", r"\]")):
        domain_xml(spec)
