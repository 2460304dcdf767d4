"""The resolved node intent of an instance (pure): everything its node needs,
from the controller's decisions (flavor and image in effect after the
instance's actions, ports in NIC order, volumes in device order), so the
node agent never re-derives them from Flavors, Images or actions."""

from __future__ import annotations

from typing import Any

from nubes.api.compute import (
    Flavor,
    Instance,
    InstanceAction,
    IntentNic,
    IntentVolume,
    NodeIntent,
    StoreSource,
)
from nubes.api.image import Image
from nubes.api.lifecycle import completed
from nubes.api.network import Port
from nubes.controllers.lifecycle import Effective
from nubes.drivers.compute.domain import DATA_TARGETS

GIB = 2**30


def image_source(image: Image) -> StoreSource:
    """An imported image's data in the store (the image must be Ready)."""
    fmt = image.status.format or "raw"
    assert image.status.sha256 and fmt in ("raw", "qcow2")
    return StoreSource(ref=image.uid, sha256=image.status.sha256, format=fmt)  # type: ignore[arg-type]


def root_source(inst: Instance, image: Image | None) -> StoreSource | None:
    """A shelved disk comes back from the store; otherwise the image."""
    shelved = inst.status.shelved_disk
    if shelved is not None and not shelved.ref.startswith("volume:"):
        return StoreSource(ref=shelved.ref, sha256=shelved.sha256, format="qcow2")
    return image_source(image) if image is not None else None


def basis(actions: list[InstanceAction]) -> str:
    done = completed(actions)
    return done[-1].status.completed_at or "" if done else ""


def node_intent(
    inst: Instance,
    flavor: Flavor,
    image: Image | None,
    disk_gib: int,
    eff: Effective,
    ports: list[Port],
    actions: list[InstanceAction],
) -> NodeIntent:
    nics = [
        IntentNic(
            port=p.name,
            port_uid=p.uid,
            mac=p.status.mac_address or "",
            mtu=p.status.mtu or 1500,
            network_uid=p.status.network_uid or "",
        )
        for p in ports
        if p.status.mac_address
    ]
    boot = inst.spec.boot_volume
    root = None if boot is not None else root_source(inst, image)
    optional: dict[str, Any] = {}  # left unset when absent: the status patch omits them
    if root is not None:
        optional["root"] = root
    if boot is not None:
        optional["boot_volume"] = IntentVolume(volume=boot.name, target="vda")
    return NodeIntent(
        **optional,
        vcpus=flavor.spec.vcpus,
        ram_mib=flavor.spec.ram_mib,
        disk_bytes=disk_gib * GIB,
        rescued=eff.rescued,
        nics=nics,
        volumes=[
            IntentVolume(volume=a.volume, target=target)
            for a, target in zip(inst.spec.volumes, DATA_TARGETS, strict=False)
        ],
        basis=basis(actions),
    )
