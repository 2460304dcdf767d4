"""Guest data on the node is readable by root and QEMU only: config drives,
volume files and backups, with the real drivers on a real filesystem."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from nubes.drivers import hostfiles
from nubes.drivers.backup.posix import PosixBackupStore
from nubes.drivers.backup.workflow import backup_volume
from nubes.drivers.compute.configdrive import ConfigDriveSpec, ensure_config_drive
from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes.base import MIB
from nubes.drivers.volumes.file import FileBackend
from tests.drivers.storage_helpers import write_at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_qemu_identity_is_what_libvirt_runs_qemu_as() -> None:
    """qemu.conf's user and group (or the build defaults it shows) agree with
    the DAC base label the running libvirtd reports."""
    ident = hostfiles.qemu_identity()
    caps = subprocess.run(
        ["virsh", "-c", "qemu:///system", "capabilities"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if caps.returncode != 0:
        pytest.skip(f"libvirtd not running: {caps.stderr.strip()}")
    labels = [
        line.split(">", 1)[1].split("<", 1)[0]
        for line in caps.stdout.splitlines()
        if "<baselabel type='qemu'>" in line or "<baselabel type='kvm'>" in line
    ]
    assert labels, caps.stdout
    assert hostfiles.parse_dac_baselabel(labels[0]) == ident
    assert ident.uid != 0 and ident.gid != 0
    print("qemu runs as", pwd.getpwuid(ident.uid).pw_name, grp.getgrgid(ident.gid).gr_name)


def test_config_drive_is_root_and_qemu_group_only(tmp_path: Path) -> None:
    gid = hostfiles.qemu_identity().gid
    instance_dir = tmp_path / "instance"
    path = instance_dir / "config.iso"
    spec = ConfigDriveSpec("u-1", "vm", "vm", user_data=b"#cloud-config\npassword: s3cret\n")
    ensure_config_drive(SubprocessRunner(), spec, str(path))
    assert mode_owner(path) == (0o640, 0, gid)
    assert mode_owner(instance_dir) == (0o750, 0, gid)
    # A drive an older agent left world-readable is tightened when re-adopted.
    os.chmod(path, 0o644)
    assert not ensure_config_drive(SubprocessRunner(), spec, str(path)).changed
    assert mode_owner(path) == (0o640, 0, gid)


def test_volume_files_and_directories_are_root_only(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir(mode=0o755)
    pool = FileBackend(SubprocessRunner(), root)
    vol = pool.create_volume("v1", 1)
    write_at(vol.path, 0, b"tenant data")
    snap = pool.create_snapshot("s1", "v1")
    try:
        for path in (Path(vol.path), Path(snap.path)):
            assert mode_owner(path) == (0o600, 0, 0), path
        for d in (root, root / "volumes", root / "snapshots", Path(snap.path).parent):
            assert mode_owner(d) == (0o700, 0, 0), d
    finally:
        pool.delete_snapshot("s1")
        pool.delete_volume("v1")


def test_backup_files_and_directories_are_root_only(tmp_path: Path) -> None:
    pool = FileBackend(SubprocessRunner(), tmp_path / "pool")
    store = PosixBackupStore(tmp_path / "backups", chunk_size=1 * MIB)
    vol = pool.create_volume("v1", 1)
    write_at(vol.path, 0, os.urandom(64 * 1024))
    try:
        backup_volume(pool, store, backup_id="b1", volume_id="v1")
        files = [p for p in (tmp_path / "backups").rglob("*") if p.is_file()]
        dirs = [tmp_path / "backups", *(p for p in (tmp_path / "backups").rglob("*") if p.is_dir())]
        assert files and len(dirs) > 1
        for path in files:
            assert mode_owner(path) == (0o600, 0, 0), path
        for d in dirs:
            assert mode_owner(d) == (0o700, 0, 0), d
    finally:
        for b in reversed(store.list_backups()):
            store.delete_backup(b.backup_id)
        pool.delete_volume("v1")


def test_qemu_conf_parsing() -> None:
    conf = (
        '#       user = "qemu"   # A user named "qemu"\n'
        '#user = "libvirt-qemu"\n'
        '#group = "libvirt-qemu"\n'
    )
    assert hostfiles.parse_qemu_conf(conf) == {"user": "libvirt-qemu", "group": "libvirt-qemu"}
    set_ = conf + 'user = "+0"\ngroup = "kvm"\n'
    assert hostfiles.parse_qemu_conf(set_) == {"user": "+0", "group": "kvm"}
    assert hostfiles.parse_dac_baselabel("+64055:+107") == hostfiles.QemuIdentity(64055, 107)
