"""The compute and image drivers against the real libvirtd and QEMU (TCG here):
the test guest boots from a cached image with a config drive, and its serial
console tells what it saw. Every test removes its domains, secrets, links
and files, and checks that it did.

Run alone (2 cores, shared machine):
    flock /tmp/nubes-heavy.lock .venv/bin/python -m pytest tests/drivers/test_compute_libvirt.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from nubes.drivers.compute.configdrive import ConfigDriveSpec, ensure_config_drive
from nubes.drivers.compute.domain import (
    ChapAuth,
    DomainSpec,
    FileDisk,
    IscsiDisk,
    Nic,
    Owner,
    domain_xml,
)
from nubes.drivers.compute.libvirt import (
    DomainConflict,
    DomainState,
    InvalidState,
    LibvirtCompute,
    LibvirtFailure,
)
from nubes.drivers.host import detect_virt_type
from nubes.drivers.images.cache import CachedImage, ImageCache, ImageSource
from nubes.drivers.runner import SubprocessRunner
from tests.drivers.guest import GuestConsole, build_guest_image

RUN = SubprocessRunner()
MIB = 2**20
GOLDEN = Path(__file__).resolve().parent.parent / "unit" / "golden"


@pytest.fixture(scope="module")
def compute() -> Iterator[LibvirtCompute]:
    driver = LibvirtCompute()
    try:
        driver.connection()
    except Exception as e:
        pytest.fail(f"libvirtd is not reachable ({e}); run hack/node-daemons.sh start")
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: QEMU runs as libvirt-qemu and must traverse it.
    path = Path(tempfile.mkdtemp(prefix="nubes-compute-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
    assert not path.exists()


@pytest.fixture(scope="module")
def base_image(workdir: Path) -> CachedImage:
    image = build_guest_image()
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    cache = ImageCache(str(workdir / "instances"), RUN)
    return cache.ensure_image(ImageSource(str(image), digest, "qcow2"))


@pytest.fixture(scope="module")
def virt_type(workdir: Path) -> str:
    return detect_virt_type(RUN, str(workdir / "host"))


class Instances:
    """Makes instance disks, config drives and specs; undefines them all at the end."""

    def __init__(self, compute: LibvirtCompute, workdir: Path, base: CachedImage, virt: str):
        self.compute = compute
        self.workdir = workdir
        self.cache = ImageCache(str(workdir / "instances"), RUN)
        self.base = base
        self.virt = virt
        self.names: list[str] = []

    def spec(
        self,
        *,
        user_data: bytes | None = None,
        data_disks: tuple[FileDisk, ...] = (),
        nics: tuple[Nic, ...] = (),
        root_mib: int = 128,
    ) -> tuple[DomainSpec, GuestConsole]:
        uid = str(uuid.uuid4())
        name = f"nubes-test-{uid[:8]}"
        home = self.workdir / "instances" / uid
        disk = self.cache.ensure_instance_disk(self.base, str(home / "disk"), root_mib * MIB)
        drive = ensure_config_drive(
            RUN,
            ConfigDriveSpec(uid, name, f"host-{uid[:8]}", {"test": "yes"}, user_data),
            str(home / "config.iso"),
        )
        spec = DomainSpec(
            name=name,
            uuid=uid,
            owner=Owner(uid, "test", name),
            vcpus=1,
            memory_mib=192,
            virt_type=self.virt,  # type: ignore[arg-type]
            root_disk=FileDisk(disk.path, "vda"),
            console_log=str(home / "console.log"),
            config_drive=drive.path,
            data_disks=data_disks,
            nics=nics,
        )
        self.names.append(name)
        return spec, GuestConsole(Path(spec.console_log))

    def boot(self, spec: DomainSpec, console: GuestConsole) -> None:
        self.compute.ensure_defined(spec)
        self.compute.start(spec.name)
        console.wait_for(r"ready uptime=.*")

    def cleanup(self) -> None:
        for name in self.names:
            self.compute.undefine(name)
            assert self.compute.state(name) == DomainState.ABSENT


@pytest.fixture
def instances(
    compute: LibvirtCompute, workdir: Path, base_image: CachedImage, virt_type: str
) -> Iterator[Instances]:
    made = Instances(compute, workdir, base_image, virt_type)
    yield made
    made.cleanup()
    owned = {d.name for d in compute.list_owned()}
    assert not owned & set(made.names), "test domains leaked"


def data_file(workdir: Path, name: str, mib: int) -> Path:
    path = workdir / name
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    path.chmod(0o644)
    return path


def test_guest_boots_with_config_drive_user_data_and_data_disk(
    instances: Instances, compute: LibvirtCompute, workdir: Path
) -> None:
    volume = data_file(workdir, "vol-boot.raw", 48)
    script = (
        b"#!/bin/sh\n"
        b"echo user-data says hello\n"
        b"for d in /sys/block/vd*; do\n"
        b"  [ $(cat $d/size) -eq $((48 * 2048)) ] && dev=${d##*/}\n"
        b"done\n"
        b"marker-write $dev written-at-boot && marker-read $dev\n"
        b"exit 7\n"
    )
    spec, console = instances.spec(
        user_data=script, data_disks=(FileDisk(str(volume), "vdb", "raw", serial="vol-boot"),)
    )
    instances.boot(spec, console)
    messages = console.markers()
    assert messages[0].startswith("boot kernel=")
    assert "disk vda 134217728" in messages  # the overlay was grown to the flavor
    assert f"disk vdb {48 * MIB}" in messages
    assert f"hostname host-{spec.uuid[:8]}" in messages
    assert f"instance-id {spec.uuid}" in messages
    begin, end = messages.index("user-data-begin"), messages.index("user-data-end")
    assert begin < end
    text = console.text()
    assert script.decode() in text.replace("\r", "")
    assert "user-data says hello" in text
    assert "marker-written vdb written-at-boot" in messages
    assert "marker vdb written-at-boot" in messages
    assert "user-data-exit 7" in messages
    assert messages[-1].startswith("ready")
    observed = compute.observe(spec.name)
    assert observed.state == DomainState.RUNNING
    assert observed.owner == Owner(spec.uuid, "test", spec.name)
    assert set(observed.disk_targets) == {"vda", "vdb", "vdz"}
    assert spec.name in {d.name for d in compute.list_owned()}
    # Repeating the disk step while the guest runs is a no-op (no image lock needed).
    again = instances.cache.ensure_instance_disk(instances.base, spec.root_disk.path, 128 * MIB)
    assert again.virtual_size == 128 * MIB
    # The marker is really on the volume: ext2 written by the guest.
    with open(volume, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"


def test_lifecycle_verbs_in_libvirt_and_in_the_guest(
    instances: Instances, compute: LibvirtCompute
) -> None:
    spec, console = instances.spec()
    assert compute.state(spec.name) == DomainState.ABSENT
    assert compute.ensure_defined(spec) is True
    assert compute.ensure_defined(spec) is False
    assert compute.state(spec.name) == DomainState.SHUTOFF
    compute.start(spec.name)
    compute.start(spec.name)  # already running
    console.wait_for(r"ready uptime=.*")

    compute.pause(spec.name)
    compute.pause(spec.name)
    assert compute.state(spec.name) == DomainState.PAUSED
    compute.unpause(spec.name)
    compute.unpause(spec.name)
    assert compute.state(spec.name) == DomainState.RUNNING

    compute.suspend(spec.name)
    compute.suspend(spec.name)
    assert compute.state(spec.name) == DomainState.SAVED
    with pytest.raises(InvalidState):
        compute.pause(spec.name)
    console.mark()
    compute.resume(spec.name)
    compute.resume(spec.name)
    assert compute.state(spec.name) == DomainState.RUNNING

    # Soft reboot: ACPI power button, the guest powers off, libvirt restarts it.
    compute.reboot(spec.name)
    console.wait_for("power-button")
    console.wait_for(r"ready uptime=.*")
    assert console.count("poweroff") == 1
    assert console.count(r"boot kernel=.*") == 1  # resume itself did not reboot
    assert compute.state(spec.name) == DomainState.RUNNING

    console.mark()
    compute.reboot(spec.name, hard=True)
    console.wait_for(r"ready uptime=.*")
    assert console.count("power-button") == 0  # a power cycle, not a request

    console.mark()
    result = compute.shutdown(spec.name, timeout=60)
    assert result.graceful
    assert console.markers()[-3:] == ["power-button", "poweroff", "shutdown"]
    assert compute.state(spec.name) == DomainState.SHUTOFF
    assert compute.shutdown(spec.name).graceful  # already off
    with pytest.raises(InvalidState):
        compute.reboot(spec.name)

    console.mark()
    compute.start(spec.name)
    console.wait_for(r"ready uptime=.*")
    compute.undefine(spec.name)
    compute.undefine(spec.name)
    assert compute.state(spec.name) == DomainState.ABSENT


def test_rescue_boots_the_rescue_disk_with_the_root_disk_second(
    instances: Instances, compute: LibvirtCompute, workdir: Path
) -> None:
    spec, console = instances.spec()
    home = Path(spec.root_disk.path).parent
    # The original root is unbootable here, so reaching `ready` proves the
    # boot came from the rescue disk.
    blank = home / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    rescue = instances.cache.ensure_instance_disk(
        instances.base, str(home / "disk.rescue"), 96 * MIB
    )
    rescued = dataclasses.replace(
        spec,
        root_disk=FileDisk(str(blank), "vdb"),
        rescue_disk=FileDisk(rescue.path, "vda"),
    )
    instances.boot(rescued, console)
    messages = console.markers()
    assert f"disk vda {96 * MIB}" in messages
    assert f"disk vdb {64 * MIB}" in messages


def test_suspended_domain_is_undefined_with_its_saved_image(
    instances: Instances, compute: LibvirtCompute
) -> None:
    spec, console = instances.spec()
    instances.boot(spec, console)
    compute.suspend(spec.name)
    save = f"/var/lib/libvirt/qemu/save/{spec.name}.save"
    assert os.path.exists(save)
    compute.undefine(spec.name)
    assert compute.state(spec.name) == DomainState.ABSENT
    assert not os.path.exists(save)


def test_shutdown_presses_again_when_the_guest_missed_the_first_press(
    instances: Instances, compute: LibvirtCompute
) -> None:
    spec, console = instances.spec()
    compute.ensure_defined(spec)
    compute.start(spec.name)
    # Pressed while the firmware and kernel are still starting: only a later
    # press can reach the guest's acpid.
    result = compute.shutdown(spec.name, timeout=90, retry_interval=2)
    assert result.graceful, console.text()[-2000:]
    assert console.markers()[-3:] == ["power-button", "poweroff", "shutdown"]
    assert compute.state(spec.name) == DomainState.SHUTOFF


def test_shutdown_destroys_a_guest_that_ignores_the_button(
    instances: Instances, compute: LibvirtCompute
) -> None:
    spec, _ = instances.spec()
    compute.ensure_defined(spec)
    compute.start(spec.name)
    compute.pause(spec.name)  # a paused guest cannot react to ACPI
    result = compute.shutdown(spec.name, timeout=5)
    assert not result.graceful
    assert compute.state(spec.name) == DomainState.SHUTOFF


def test_disk_hotplug_is_seen_by_the_guest(
    instances: Instances, compute: LibvirtCompute, workdir: Path
) -> None:
    spec, console = instances.spec()
    instances.boot(spec, console)
    volume = data_file(workdir, "vol-hot.raw", 40)
    disk = FileDisk(str(volume), "vdc", "raw", serial="vol-hot")
    console.mark()
    assert compute.attach_disk(spec.name, disk) is True
    assert compute.attach_disk(spec.name, disk) is False
    added = console.wait_for(rf"disk-added (vd[a-z]+) {40 * MIB}")
    assert "vdc" in compute.observe(spec.name).disk_targets
    compute.shutdown(spec.name, timeout=0)  # persistent too: still there when off
    assert "vdc" in compute.observe(spec.name).disk_targets
    console.mark()
    compute.start(spec.name)
    console.wait_for(rf"disk {added.group(1)} {40 * MIB}")
    console.wait_for(r"ready uptime=.*")
    console.mark()
    assert compute.detach_disk(spec.name, "vdc", timeout=60) is True
    console.wait_for(rf"disk-removed {added.group(1)}")
    assert compute.detach_disk(spec.name, "vdc") is False
    assert "vdc" not in compute.observe(spec.name).disk_targets
    # The guest wrote nothing to it and QEMU let go of it.
    assert volume.stat().st_size == 40 * MIB


def test_defining_refuses_foreign_and_conflicting_domains(
    instances: Instances, compute: LibvirtCompute
) -> None:
    spec, _ = instances.spec()
    foreign = domain_xml(spec).split("<metadata>")[0] + domain_xml(spec).split("</metadata>")[1]
    conn = compute.connection()
    dom = conn.defineXML(foreign)
    try:
        with pytest.raises(DomainConflict, match="not managed by Nubes"):
            compute.ensure_defined(spec)
        with pytest.raises(DomainConflict, match="not managed by Nubes"):
            compute.undefine(spec.name)
        assert spec.name not in {d.name for d in compute.list_owned()}
    finally:
        dom.undefine()
    compute.ensure_defined(spec)
    other = dataclasses.replace(spec, uuid=str(uuid.uuid4()))
    with pytest.raises(DomainConflict, match="exists with UUID"):
        compute.ensure_defined(other)
    bigger = dataclasses.replace(spec, memory_mib=256)
    assert compute.ensure_defined(bigger) is True
    xml = conn.lookupByName(spec.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<memory unit='KiB'>262144</memory>" in xml


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("domain-*.xml")))
def test_golden_domain_xml_is_accepted_by_libvirt(compute: LibvirtCompute, golden: str) -> None:
    uid = str(uuid.uuid4())
    xml = (GOLDEN / golden).read_text()
    name = f"nubes-golden-{uid[:8]}"
    xml = xml.replace("0b6c2f0e-3c1d-4e8e-9d7a-2f1e5a6b7c8d", uid)
    xml = xml.replace(f"<name>nubes-{uid}</name>", f"<name>{name}</name>")
    if not os.path.exists("/dev/kvm"):
        xml = xml.replace('type="kvm"', 'type="qemu"')
    conn = compute.connection()
    dom = conn.defineXML(xml)
    try:
        assert dom.name() == name
        assert dom.UUIDString() == uid
    finally:
        compute.undefine(name)
    assert compute.state(name) == DomainState.ABSENT


def test_iscsi_secrets_are_idempotent_and_removed(compute: LibvirtCompute) -> None:
    usage = f"nubes-test-chap-{uuid.uuid4().hex[:8]}"
    first = compute.ensure_iscsi_secret(usage, "s3cret-one", "test")
    assert compute.ensure_iscsi_secret(usage, "s3cret-two") == first
    conn = compute.connection()
    secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
    assert secret.UUIDString() == first
    compute.delete_iscsi_secret(usage)
    compute.delete_iscsi_secret(usage)
    with pytest.raises(libvirt.libvirtError):
        conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def dhcp_bridge(workdir: Path) -> Iterator[tuple[str, str]]:
    """A Linux bridge with no uplink, and dnsmasq in a namespace of our own
    serving 10.213.7.0/24 on it (router .1, MTU 1400)."""
    tag = uuid.uuid4().hex[:6]
    bridge, netns, outer, inner = f"nbt{tag}", f"nubes-t-{tag}", f"nbv{tag}", f"nbi{tag}"
    pidfile = workdir / f"dnsmasq-{tag}.pid"
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "set", bridge, "up")
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", netns)
        sh("ip", "link", "set", outer, "master", bridge, "up")
        sh("ip", "-n", netns, "addr", "add", "10.213.7.2/24", "dev", inner)
        sh("ip", "-n", netns, "link", "set", inner, "up")
        sh(
            "ip", "netns", "exec", netns, "dnsmasq", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--interface={inner}", "--port=0",
            "--dhcp-range=10.213.7.50,10.213.7.60,255.255.255.0,1h",
            "--dhcp-option=option:router,10.213.7.1", "--dhcp-option-force=option:mtu,1400",
            f"--pid-file={pidfile}", f"--dhcp-leasefile={workdir / f'leases-{tag}'}",
        )  # fmt: skip
        yield bridge, f"nbp{tag}"
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, 15)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        subprocess.run(["ip", "link", "del", outer], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], check=False)
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    assert netns not in sh("ip", "netns", "list")


def test_guest_gets_dhcp_lease_router_and_mtu(
    instances: Instances, compute: LibvirtCompute, dhcp_bridge: tuple[str, str]
) -> None:
    bridge, tap = dhcp_bridge
    nic = Nic(bridge, tap, "fa:16:3e:12:34:56", mtu=1500)
    spec, console = instances.spec(nics=(nic,))
    instances.boot(spec, console)
    lease = console.wait_for(r"lease (eth0) ip=(10\.213\.7\.\d+)/24 router=(\S+) mtu=(\d+).*")
    assert lease.group(3) == "10.213.7.1"
    assert lease.group(4) == "1400"
    assert tap in sh("ip", "link", "show", "master", bridge)
    compute.undefine(spec.name)
    assert subprocess.run(["ip", "link", "show", tap], capture_output=True).returncode != 0


def tgtadm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tgtadm", "--lld", "iscsi", *args], check=check, capture_output=True, text=True
    )


@pytest.fixture
def chap_target(workdir: Path) -> Iterator[tuple[str, str, str]]:
    """A tgt target on loopback with a 24 MiB file LUN behind CHAP; yields
    (iqn, user, password). The tid is random: tgtd is shared with other tests."""
    if tgtadm("--op", "show", "--mode", "sys", check=False).returncode != 0:
        pytest.fail("tgtd is not running; run hack/node-daemons.sh start")
    tag = uuid.uuid4().hex[:8]
    iqn, user, password = f"iqn.2010-10.io.nubes.test:{tag}", f"nubes-{tag}", f"pw-{tag}-Secret1"
    lun_file = data_file(workdir, f"lun-{tag}.raw", 24)
    tid = ""
    for candidate in range(int(tag[:4], 16) % 50000 + 10000, 65000):
        if tgtadm("--op", "new", "--mode", "target", "--tid", str(candidate), "-T", iqn,
                  check=False).returncode == 0:  # fmt: skip
            tid = str(candidate)
            break
    assert tid, "no free tgt tid"
    try:
        tgtadm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
               "-b", str(lun_file))  # fmt: skip
        tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-I", "127.0.0.1")
        tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", user)
        yield iqn, user, password
    finally:
        tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", tid, check=False)
        tgtadm("--op", "delete", "--mode", "account", "--user", user, check=False)
        lun_file.unlink()
    shown = tgtadm("--op", "show", "--mode", "target").stdout
    assert iqn not in shown
    assert user not in tgtadm("--op", "show", "--mode", "account").stdout


def test_iscsi_disk_with_chap_hotplugs_through_qemu_initiator(
    instances: Instances, compute: LibvirtCompute, chap_target: tuple[str, str, str]
) -> None:
    iqn, user, password = chap_target
    usage = f"nubes-test-{user}"
    spec, console = instances.spec()
    instances.boot(spec, console)
    disk = IscsiDisk("127.0.0.1", iqn, 1, "vdd", chap=ChapAuth(user, usage), serial="vol-iscsi")
    try:
        compute.ensure_iscsi_secret(usage, "wrong-password")
        with pytest.raises(LibvirtFailure):
            compute.attach_disk(spec.name, disk)
        assert "vdd" not in compute.observe(spec.name).disk_targets
        compute.ensure_iscsi_secret(usage, password)
        console.mark()
        assert compute.attach_disk(spec.name, disk) is True
        added = console.wait_for(rf"disk-added (vd[a-z]+) {24 * MIB}")
        console.mark()
        assert compute.detach_disk(spec.name, "vdd", timeout=60) is True
        console.wait_for(rf"disk-removed {added.group(1)}")
    finally:
        compute.undefine(spec.name)
        compute.delete_iscsi_secret(usage)
    conn = compute.connection()
    with pytest.raises(libvirt.libvirtError):
        conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
