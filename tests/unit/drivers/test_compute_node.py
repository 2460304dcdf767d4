"""The compute node driver's sync verbs against fakes of libvirt, the image
cache and the VIF plugger (their own tests use the real daemons): what
`sync` does for a plan, and that it is idempotent."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nubes.agent.compute_plan import NodeFacts, Plan, VolumeDisk, plan_guest
from nubes.api.compute import Instance, IntentNic
from nubes.drivers.compute.domain import DataDisk, DomainSpec
from nubes.drivers.compute.libvirt import DomainState, ObservedDomain
from nubes.drivers.compute.node import ComputeNode, GuestPlan
from nubes.drivers.images.cache import CachedImage, DiskInfo, ImageSource
from nubes.drivers.images.inspect import ImageFormat
from nubes.drivers.runner import Result

UID = "0f8e2c1a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"


class FakeLibvirt:
    def __init__(self) -> None:
        self.states: dict[str, DomainState] = {}
        self.specs: dict[str, DomainSpec] = {}
        self.secrets: dict[str, str] = {}
        self.disks: dict[str, list[str]] = {}
        self.calls: list[str] = []

    def state(self, name: str) -> DomainState:
        return self.states.get(name, DomainState.ABSENT)

    def ensure_defined(self, spec: DomainSpec) -> bool:
        self.specs[spec.name] = spec
        self.states.setdefault(spec.name, DomainState.SHUTOFF)
        self.disks.setdefault(spec.name, [d.target for d in spec.data_disks])
        return True

    def start(self, name: str, *, paused: bool = False) -> None:
        self.calls.append("start paused" if paused else "start")
        self.states[name] = DomainState.PAUSED if paused else DomainState.RUNNING

    def unpause(self, name: str) -> None:
        self.calls.append("unpause")
        self.states[name] = DomainState.RUNNING

    def shutdown(self, name: str, timeout: float = 0) -> None:
        self.calls.append("shutdown")
        if name in self.states:
            self.states[name] = DomainState.SHUTOFF

    def observe(self, name: str) -> ObservedDomain:
        targets = ("vda", *self.disks.get(name, []))
        return ObservedDomain(name, "", self.state(name), None, targets)

    def attach_disk(self, name: str, disk: DataDisk) -> bool:
        self.calls.append(f"attach {disk.target}")
        self.disks[name].append(disk.target)
        return True

    def detach_disk(self, name: str, target: str, *, timeout: float = 30) -> bool:
        self.calls.append(f"detach {target}")
        self.disks[name].remove(target)
        return True

    def ensure_iscsi_secret(self, usage: str, password: str, description: str = "") -> str:
        self.secrets[usage] = password
        return usage

    def iscsi_secret_usages(self) -> list[str]:
        return list(self.secrets)

    def delete_iscsi_secret(self, usage: str) -> None:
        self.secrets.pop(usage, None)

    def undefine(self, name: str) -> None:
        self.calls.append("undefine")
        self.states.pop(name, None)


class FakeCache:
    def ensure_image(self, source: ImageSource) -> CachedImage:
        return CachedImage(source.sha256, "/base", 2**30, ImageFormat.QCOW2)

    def ensure_instance_disk(self, base: CachedImage, path: str, size: int | None) -> None:
        Path(path).write_bytes(b"qcow2")

    def disk_info(self, path: str) -> DiskInfo:
        return DiskInfo(path, 2**30, "/base")

    def grow_disk(self, path: str, size: int) -> None:
        raise AssertionError("not grown in these tests")


class FakeVifs:
    def __init__(self) -> None:
        self.plugged: set[str] = set()

    def plug_hybrid(self, port_uid: str, mac: str, mtu: int) -> None:
        self.plugged.add(port_uid)

    def unplug(self, port_uid: str) -> None:
        self.plugged.discard(port_uid)


def no_commands(argv: Any, **_: Any) -> Result:
    raise AssertionError(f"no command expected: {argv}")


def node(tmp_path: Path) -> tuple[ComputeNode, FakeLibvirt, FakeVifs]:
    libvirt, vifs = FakeLibvirt(), FakeVifs()
    compute = ComputeNode(
        no_commands,
        libvirt,  # type: ignore[arg-type]
        FakeCache(),  # type: ignore[arg-type]
        vifs,  # type: ignore[arg-type]
        tmp_path / "instances",
    )
    return compute, libvirt, vifs


def guest(tmp_path: Path, **plan: Any) -> GuestPlan:
    inst = Instance.model_validate(
        {
            "metadata": {"name": "vm", "namespace": "p", "uid": UID},
            "spec": {"flavor": "small", "configDrive": False},
        }
    )
    base = Plan(
        inst=inst,
        vcpus=1,
        ram_mib=256,
        disk_bytes=0,
        root_source=ImageSource("/store/img", "ab" * 32, "qcow2"),
        nics=[IntentNic(port="vm-0", port_uid="p0", mac="fa:16:3e:00:00:01", mtu=1450)],
    )
    facts = NodeFacts("n1", "1a2b3c4d", str(tmp_path / "instances"), "qemu")
    return plan_guest(dataclasses.replace(base, **plan), facts)


def test_sync_builds_and_starts_once_ports_may_carry_traffic(tmp_path: Path) -> None:
    compute, libvirt, vifs = node(tmp_path)
    plan = guest(tmp_path)
    name = plan.domain.name
    assert compute.sync(plan, "Running", lambda: False) == DomainState.SHUTOFF
    assert vifs.plugged == {"p0"} and Path(plan.directory, "disk").exists()
    assert "start" not in libvirt.calls  # never on a port that is not bound
    assert compute.sync(plan, "Running", lambda: True) == DomainState.RUNNING
    assert compute.sync(plan, "Running", lambda: True) == DomainState.RUNNING
    assert libvirt.calls.count("start") == 1  # idempotent
    assert Path(plan.directory, "boot-config").read_text() == plan.boot_digest

    bigger = guest(tmp_path, ram_mib=512)  # needs a cold restart
    assert compute.sync(bigger, "Running", lambda: True) == DomainState.RUNNING
    assert libvirt.calls[-2:] == ["shutdown", "start"]
    assert libvirt.specs[name].memory_mib == 512


def test_a_staged_guest_runs_only_once_its_ports_are_bound(tmp_path: Path) -> None:
    compute, libvirt, vifs = node(tmp_path)
    plan = guest(tmp_path)
    compute.plug(plan.vifs)
    assert compute.stage(plan) == DomainState.PAUSED
    assert vifs.plugged == {"p0"} and libvirt.calls == ["start paused"]
    assert compute.stage(plan) == DomainState.PAUSED  # idempotent
    assert compute.sync(plan, "Running", lambda: False) == DomainState.PAUSED
    assert "unpause" not in libvirt.calls
    assert compute.sync(plan, "Running", lambda: True) == DomainState.RUNNING
    # Started once: staged with the definition it runs, no cold restart.
    assert libvirt.calls == ["start paused", "unpause"]
    assert compute.stage(plan) == DomainState.RUNNING and libvirt.calls[-1] == "unpause"


def test_volumes_are_hot_plugged_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    compute, libvirt, vifs = node(tmp_path)
    compute.sync(guest(tmp_path), "Running", lambda: True)
    vol = VolumeDisk("data", "vdb", "127.0.0.1", 3260, "iqn.2010-10.io.nubes:v", 1, "u", "pw")
    with_volume = guest(tmp_path, volumes=[vol])
    compute.sync(with_volume, "Running", lambda: True)
    assert libvirt.calls[-1] == "attach vdb" and "shutdown" not in libvirt.calls
    assert list(libvirt.secrets) == [f"nubes-volume-{UID}-data-1a2b3c4d"]
    compute.sync(guest(tmp_path), "Running", lambda: True)
    assert libvirt.calls[-1] == "detach vdb" and not libvirt.secrets

    plan = with_volume
    compute.sync(plan, "Running", lambda: True)
    compute.teardown(plan.domain.name, Path(plan.directory), plan.secret_prefix, plan.secret_suffix)
    assert not libvirt.states and not libvirt.secrets and not vifs.plugged
    assert not Path(plan.directory).exists()
