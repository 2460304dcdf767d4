"""Config drives built with the real genisoimage and read back with isoinfo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nubes.drivers.compute.configdrive import (
    ConfigDriveSpec,
    NetworkDataPort,
    content_digest,
    contents,
    delete_config_drive,
    ensure_config_drive,
    network_data,
)
from nubes.drivers.runner import SubprocessRunner

pytestmark = pytest.mark.skipif(
    shutil.which("genisoimage") is None or shutil.which("isoinfo") is None,
    reason="needs genisoimage",
)

SPEC = ConfigDriveSpec(
    uuid="0b6c2f0e-3c1d-4e8e-9d7a-2f1e5a6b7c8d",
    name="web-1",
    hostname="web-1",
    metadata={"role": "web", "tier": "front"},
    user_data=b"#!/bin/sh\necho hello\n",
    ports=(
        NetworkDataPort("p-1", "FA:16:3E:00:00:01", 1450, "net-a"),
        NetworkDataPort(
            "p-2",
            "fa:16:3e:00:00:02",
            1500,
            "net-b",
            "10.0.0.5/24",
            "10.0.0.1",
            ("10.0.0.2", "10.0.0.3"),
        ),
    ),
    public_keys={"default": "ssh-ed25519 AAAA test"},
    availability_zone="nova",
    project="demo",
)


def read(iso: str, name: str) -> bytes:
    return subprocess.run(
        ["isoinfo", "-i", iso, "-R", "-x", f"/{name}"], check=True, capture_output=True
    ).stdout


def volume_id(iso: str) -> str:
    with open(iso, "rb") as f:
        f.seek(0x8028)
        return f.read(32).decode().strip()


def test_drive_has_label_and_openstack_layout(tmp_path: Path) -> None:
    path = str(tmp_path / "config.iso")
    drive = ensure_config_drive(SubprocessRunner(), SPEC, path)
    assert drive.changed and drive.path == path
    assert volume_id(path) == "config-2"
    meta = json.loads(read(path, "openstack/latest/meta_data.json"))
    assert meta == {
        "uuid": SPEC.uuid,
        "name": "web-1",
        "hostname": "web-1",
        "launch_index": 0,
        "meta": {"role": "web", "tier": "front"},
        "public_keys": {"default": "ssh-ed25519 AAAA test"},
        "availability_zone": "nova",
        "project_id": "demo",
    }
    assert read(path, "openstack/latest/user_data") == SPEC.user_data
    net = json.loads(read(path, "openstack/latest/network_data.json"))
    assert net == network_data(SPEC.ports)
    assert json.loads(read(path, "openstack/latest/vendor_data.json")) == {}
    assert os.stat(path).st_mode & 0o777 == 0o640  # root and QEMU's group only


def test_network_data_describes_dhcp_and_static_ports() -> None:
    net = network_data(SPEC.ports)
    assert [link["ethernet_mac_address"] for link in net["links"]] == [
        "fa:16:3e:00:00:01",
        "fa:16:3e:00:00:02",
    ]
    assert net["links"][0]["mtu"] == 1450
    dhcp, static = net["networks"]
    assert dhcp["type"] == "ipv4_dhcp" and dhcp["link"] == net["links"][0]["id"]
    assert (static["type"], static["ip_address"], static["netmask"]) == (
        "ipv4",
        "10.0.0.5",
        "255.255.255.0",
    )
    assert static["routes"] == [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"}]
    assert net["services"] == [
        {"type": "dns", "address": "10.0.0.2"},
        {"type": "dns", "address": "10.0.0.3"},
    ]


def test_same_content_is_not_rewritten_and_new_content_is(tmp_path: Path) -> None:
    run = SubprocessRunner()
    path = str(tmp_path / "config.iso")
    first = ensure_config_drive(run, SPEC, path)
    inode = os.stat(path).st_ino
    again = ensure_config_drive(run, SPEC, path)
    assert (again.changed, again.sha256) == (False, first.sha256)
    assert os.stat(path).st_ino == inode
    other = ConfigDriveSpec(SPEC.uuid, SPEC.name, SPEC.hostname, user_data=b"new")
    changed = ensure_config_drive(run, other, path)
    assert changed.changed and changed.sha256 != first.sha256
    assert read(path, "openstack/latest/user_data") == b"new"
    assert sorted(os.listdir(tmp_path)) == ["config.iso"]  # no temporary leftovers
    delete_config_drive(path)
    delete_config_drive(path)
    assert not os.path.exists(path)


def test_contents_are_deterministic_and_user_data_optional() -> None:
    assert contents(SPEC) == contents(SPEC)
    reordered = ConfigDriveSpec(
        SPEC.uuid, SPEC.name, SPEC.hostname, metadata={"tier": "front", "role": "web"}
    )
    plain = ConfigDriveSpec(SPEC.uuid, SPEC.name, SPEC.hostname, metadata=dict(SPEC.metadata))
    assert content_digest(contents(reordered)) == content_digest(contents(plain))
    assert "openstack/latest/user_data" not in contents(plain)
