"""The compute planner (pure): intent fixtures + node facts -> GuestPlan,
its domain rendered by the XML builder and compared with golden files in
tests/unit/golden/guest/ (NUBES_UPDATE_GOLDEN=1 rewrites them after a
deliberate change)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nubes.agent.compute_plan import NodeFacts, Plan, VolumeDisk, boot_digest, plan_guest
from nubes.api.compute import Instance, IntentNic
from nubes.drivers.compute.domain import FileDisk, IscsiDisk, domain_xml
from nubes.drivers.compute.node import IscsiSecret, LocalDisk, VifPlug
from nubes.drivers.images.cache import ImageSource

GOLDEN = Path(__file__).resolve().parent / "golden" / "guest"
UID = "0f8e2c1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
FACTS = NodeFacts(
    node="node-1", node_tag="1a2b3c4d", instances_dir="/var/lib/nubes/instances", virt_type="qemu"
)
SOURCE = ImageSource("/srv/images/img-uid", "ab" * 32, "qcow2")


def instance(**spec: Any) -> Instance:
    return Instance.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "p", "uid": UID},
            "spec": {"flavor": "small", **spec},
        }
    )


def nic(i: int) -> IntentNic:
    return IntentNic(
        port=f"vm-{i}",
        port_uid=f"9{i}8e2c1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        mac=f"fa:16:3e:00:00:0{i}",
        mtu=1450,
        network_uid="net-uid",
    )


def volume(name: str, target: str) -> VolumeDisk:
    return VolumeDisk(name, target, "127.0.0.1", 3260, f"iqn.2010-10.io.nubes:{name}", 1, "u", "pw")


def check(name: str, xml: str) -> None:
    path = GOLDEN / f"{name}.xml"
    if os.environ.get("NUBES_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(xml)
    assert xml == path.read_text(), f"{name}: domain differs from the golden file"


def test_image_backed_guest_with_nics_volume_and_config_drive() -> None:
    plan = Plan(
        inst=instance(image={"name": "cirros"}, userData="#!/bin/sh\necho hi\n"),
        vcpus=2,
        ram_mib=512,
        disk_bytes=2 * 2**30,
        root_source=SOURCE,
        nics=[nic(0), nic(1)],
        volumes=[volume("data", "vdb")],
    )
    guest = plan_guest(plan, FACTS)
    directory = f"/var/lib/nubes/instances/{UID}"
    assert guest.directory == directory
    assert guest.root == LocalDisk(f"{directory}/disk", SOURCE, 2 * 2**30)
    assert guest.vifs == (
        VifPlug(nic(0).port_uid, "fa:16:3e:00:00:00", 1450),
        VifPlug(nic(1).port_uid, "fa:16:3e:00:00:01", 1450),
    )
    usage = f"nubes-volume-{UID}-data-1a2b3c4d"
    assert guest.secrets == (IscsiSecret(usage, "pw"),)
    assert (guest.secret_prefix, guest.secret_suffix) == (f"nubes-volume-{UID}-", "-1a2b3c4d")
    drive = guest.config_drive
    assert drive is not None and drive.user_data == b"#!/bin/sh\necho hi\n"
    assert [p.mac for p in drive.ports] == ["fa:16:3e:00:00:00", "fa:16:3e:00:00:01"]
    assert guest.boot_digest == boot_digest(guest.domain, 2 * 2**30)
    check("image-nics-volume", domain_xml(guest.domain))


def test_volume_backed_guest_in_rescue_mode() -> None:
    plan = Plan(
        inst=instance(bootVolume={"name": "root"}, configDrive=False),
        vcpus=1,
        ram_mib=256,
        disk_bytes=0,
        root_source=None,
        boot_volume=volume("root", "vda"),
    )
    facts = NodeFacts(**{**FACTS.__dict__, "rescue_disk_present": True})
    guest = plan_guest(plan, facts)
    assert guest.root is None and guest.config_drive is None and guest.vifs == ()
    assert isinstance(guest.domain.root_disk, IscsiDisk) and guest.domain.root_disk.target == "vda"
    assert guest.domain.rescue_disk == FileDisk(
        f"/var/lib/nubes/instances/{UID}/rescue.qcow2", "vdy"
    )
    check("volume-rescue", domain_xml(guest.domain))


def test_the_boot_digest_follows_what_needs_a_restart() -> None:
    base = Plan(inst=instance(), vcpus=1, ram_mib=256, disk_bytes=2**30, root_source=SOURCE)
    first = plan_guest(base, FACTS)
    same = plan_guest(Plan(**{**base.__dict__, "volumes": [volume("d", "vdb")]}), FACTS)
    bigger = plan_guest(Plan(**{**base.__dict__, "ram_mib": 512}), FACTS)
    assert first.boot_digest == same.boot_digest  # volumes are hot-plugged
    assert first.boot_digest != bigger.boot_digest
