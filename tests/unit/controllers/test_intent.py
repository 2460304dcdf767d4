"""The node intent the controller resolves for an instance (pure), checked
against golden files: what a node gets to run the instance, with the flavor,
image, ports, volumes and finished actions applied."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nubes.api.compute import Flavor, Instance, InstanceAction
from nubes.api.image import Image
from nubes.api.network import Port
from nubes.controllers.instance import root_disk_gib
from nubes.controllers.intent import node_intent
from nubes.controllers.lifecycle import effective

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "intent"
SHA = "ab" * 32
UID = "0f8e2c1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"


def instance(**spec: Any) -> Instance:
    return Instance.model_validate(
        {
            "metadata": {
                "name": "vm",
                "namespace": "p",
                "uid": "11111111-2222-3333-4444-555555555555",
            },
            "spec": {"flavor": "small", **spec},
        }
    )


def flavor(name: str, vcpus: int, ram: int, disk: int) -> Flavor:
    return Flavor.model_validate(
        {"metadata": {"name": name}, "spec": {"vcpus": vcpus, "ramMib": ram, "diskGib": disk}}
    )


def image() -> Image:
    return Image.model_validate(
        {
            "metadata": {"name": "cirros", "namespace": "p", "uid": UID},
            "spec": {"source": {"url": "https://example.org/c.img"}, "diskFormat": "qcow2"},
            "status": {"sha256": SHA, "format": "qcow2", "virtualSizeBytes": 3 * 2**30 // 2},
        }
    )


def port(name: str, uid: str, mac: str | None, mtu: int = 1450) -> Port:
    return Port.model_validate(
        {
            "metadata": {"name": name, "namespace": "p", "uid": uid},
            "spec": {"network": {"name": "net"}},
            "status": {"macAddress": mac, "mtu": mtu, "networkUid": "net-uid"},
        }
    )


def resize(completed: str) -> InstanceAction:
    return InstanceAction.model_validate(
        {
            "metadata": {"name": "grow", "namespace": "p"},
            "spec": {"instance": "vm", "action": "Resize", "flavor": "big"},
            "status": {"flavor": "big", "completedAt": completed},
        }
    )


def check(name: str, got: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if os.environ.get("NUBES_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name}: intent differs from the golden file"


def resolve(inst: Instance, flavors: dict[str, Flavor], img: Image | None, **kw: Any) -> Any:
    actions: list[InstanceAction] = kw.get("actions", [])
    eff = effective(inst, actions)
    fl = flavors[eff.flavor]
    return node_intent(inst, fl, img, root_disk_gib(fl, img), eff, kw.get("ports", []), actions)


def test_image_backed_instance_with_nics_and_volumes() -> None:
    inst = instance(
        image={"name": "cirros"},
        networks=[{"network": {"name": "net"}}, {"network": {"name": "net"}}],
        volumes=[{"volume": "data"}, {"volume": "logs"}],
    )
    ports = [port("vm-0", "p0", "fa:16:3e:00:00:01"), port("vm-1", "p1", "fa:16:3e:00:00:02")]
    intent = resolve(inst, {"small": flavor("small", 1, 256, 0)}, image(), ports=ports)
    check("image-nics-volumes", intent.wire())


def test_ports_without_a_mac_are_not_nics_yet() -> None:
    inst = instance(image={"name": "cirros"}, networks=[{"network": {"name": "net"}}])
    intent = resolve(
        inst, {"small": flavor("small", 1, 256, 1)}, image(), ports=[port("vm-0", "p0", None)]
    )
    assert intent.nics == [] and intent.disk_bytes == 2**30


def test_a_finished_resize_is_the_basis() -> None:
    inst = instance(image={"name": "cirros"})
    flavors = {"small": flavor("small", 1, 256, 1), "big": flavor("big", 2, 1024, 4)}
    intent = resolve(inst, flavors, image(), actions=[resize("2026-01-01T00:00:03.000001Z")])
    check("resized", intent.wire())


def test_volume_backed_and_shelved_roots() -> None:
    boot = instance(bootVolume={"name": "root"})
    intent = resolve(boot, {"small": flavor("small", 1, 256, 0)}, None)
    assert intent.root is None and intent.boot_volume.target == "vda"
    shelved = Instance.model_validate(
        {
            **instance(image={"name": "cirros"}).model_dump(by_alias=True),
            "status": {"shelvedDisk": {"ref": f"shelved/{UID}.qcow2", "sha256": SHA}},
        }
    )
    intent = resolve(shelved, {"small": flavor("small", 1, 256, 1)}, image())
    check("shelved", intent.wire())
