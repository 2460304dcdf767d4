"""Config drives: an ISO 9660 volume labelled config-2 in the OpenStack layout.

    openstack/latest/meta_data.json     uuid, name, hostname, meta, public_keys
    openstack/latest/user_data          as given (absent when there is none)
    openstack/latest/network_data.json  links, networks, services
    openstack/latest/vendor_data.json   {}

The files are deterministic (sorted JSON); the ISO itself carries a creation
time, so its application id records the SHA-256 of the content instead, and
`ensure_config_drive` rewrites the file only when that content changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from nubes.drivers.hostfiles import guest_file, make_guest_dir
from nubes.drivers.runner import Runner

log = structlog.get_logger()

LABEL = "config-2"
# Where ISO 9660 keeps the application identifier (primary volume descriptor).
APP_ID_OFFSET = 0x8000 + 574
APP_ID_PREFIX = "nubes-config-drive sha256="


@dataclass(frozen=True)
class NetworkDataPort:
    """One NIC as network_data.json describes it to cloud-init style guests."""

    port_id: str
    mac: str
    mtu: int
    network_id: str
    ip_cidr: str | None = None
    """Static address with prefix (e.g. 10.0.0.5/24); None means DHCP."""
    gateway: str | None = None
    dns_nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigDriveSpec:
    uuid: str
    name: str
    hostname: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    user_data: bytes | None = None
    ports: tuple[NetworkDataPort, ...] = ()
    public_keys: Mapping[str, str] = field(default_factory=dict)
    availability_zone: str | None = None
    project: str | None = None


@dataclass(frozen=True)
class ConfigDrive:
    path: str
    sha256: str
    """Digest of the content (not of the ISO bytes)."""
    changed: bool


def meta_data(spec: ConfigDriveSpec) -> dict[str, Any]:
    data: dict[str, Any] = {
        "uuid": spec.uuid,
        "name": spec.name,
        "hostname": spec.hostname,
        "launch_index": 0,
        "meta": dict(spec.metadata),
        "public_keys": dict(spec.public_keys),
    }
    if spec.availability_zone:
        data["availability_zone"] = spec.availability_zone
    if spec.project:
        data["project_id"] = spec.project
    return data


def network_data(ports: tuple[NetworkDataPort, ...]) -> dict[str, Any]:
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    dns: list[str] = []
    for i, port in enumerate(ports):
        link_id = f"tap{port.port_id.replace('-', '')[:11]}"
        links.append(
            {
                "id": link_id,
                "type": "bridge",
                "ethernet_mac_address": port.mac.lower(),
                "mtu": port.mtu,
                "vif_id": port.port_id,
            }
        )
        net: dict[str, Any] = {"id": f"network{i}", "link": link_id, "network_id": port.network_id}
        if port.ip_cidr is None:
            net["type"] = "ipv4_dhcp"
        else:
            iface = ipaddress.ip_interface(port.ip_cidr)
            net["type"] = "ipv4" if iface.version == 4 else "ipv6"
            net["ip_address"] = str(iface.ip)
            net["netmask"] = str(iface.network.netmask)
            net["routes"] = (
                [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": port.gateway}]
                if port.gateway and iface.version == 4
                else []
            )
        networks.append(net)
        dns.extend(d for d in port.dns_nameservers if d not in dns)
    return {
        "links": links,
        "networks": networks,
        "services": [{"type": "dns", "address": d} for d in dns],
    }


def contents(spec: ConfigDriveSpec) -> dict[str, bytes]:
    """Relative path -> bytes of every file on the drive."""

    def js(value: Any) -> bytes:
        return (json.dumps(value, sort_keys=True, indent=2) + "\n").encode()

    files = {
        "openstack/latest/meta_data.json": js(meta_data(spec)),
        "openstack/latest/network_data.json": js(network_data(spec.ports)),
        "openstack/latest/vendor_data.json": js({}),
    }
    if spec.user_data is not None:
        files["openstack/latest/user_data"] = spec.user_data
    return files


def content_digest(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def recorded_digest(path: str) -> str | None:
    """The content digest an ISO made here carries, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(APP_ID_OFFSET)
            app_id = f.read(128).decode("ascii", "replace").strip()
    except OSError:
        return None
    return app_id.removeprefix(APP_ID_PREFIX) if app_id.startswith(APP_ID_PREFIX) else None


def ensure_config_drive(runner: Runner, spec: ConfigDriveSpec, path: str) -> ConfigDrive:
    """Write the config drive ISO at `path` unless it already has this content.

    The new file replaces the old one by rename, so a running QEMU keeps
    reading the drive it opened.
    """
    files = contents(spec)
    digest = content_digest(files)
    if recorded_digest(path) == digest:
        guest_file(path)  # one written by an older agent may be world-readable
        return ConfigDrive(path, digest, changed=False)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        make_guest_dir(parent)
    with tempfile.TemporaryDirectory(prefix=".configdrive-", dir=parent) as tmp:
        tree = os.path.join(tmp, "tree")
        for name, data in files.items():
            target = os.path.join(tree, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        iso = os.path.join(tmp, "config.iso")
        runner(
            [
                "genisoimage",
                "-quiet",
                "-o",
                iso,
                "-V",
                LABEL,
                "-A",
                APP_ID_PREFIX + digest,
                "-publisher",
                "Nubes",
                "-input-charset",
                "utf-8",
                "-ldots",
                "-allow-lowercase",
                "-allow-multidot",
                "-l",
                "-J",
                "-r",
                tree,
            ]
        )
        # User data often holds credentials: root and QEMU only.
        guest_file(iso)
        os.replace(iso, path)
    log.info("config drive written", path=path, sha256=digest)
    return ConfigDrive(path, digest, changed=True)


def delete_config_drive(path: str) -> None:
    """Remove the drive; succeeds when it is already gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
