"""A narrow client for one Open vSwitch instance (ovs-vsctl, ovs-ofctl).

Every call names the database socket and the bridge management socket
explicitly, so several switches (one per simulated node) can live on one
machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from nubes.drivers.runner import CommandError, Runner

DatapathType = Literal["system", "netdev"]


@dataclass(frozen=True)
class OvsEndpoint:
    """Where an Open vSwitch instance listens."""

    db: str = "unix:/var/run/openvswitch/db.sock"
    rundir: str = "/var/run/openvswitch"
    netns: str | None = None
    """Network namespace ovs-vswitchd runs in (its ports live there)."""


@dataclass(frozen=True)
class OvsPort:
    name: str
    ofport: int
    tag: int | None
    type: str
    external_ids: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    vlan_mode: str | None = None
    """None is OVS's default: access when tagged, trunk of every VLAN when not."""
    trunks: tuple[int, ...] = ()


def _ovs_map(value: Any) -> dict[str, str]:
    """Decode an OVSDB map (["map", [[k, v], ...]]) from ovs-vsctl JSON."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return {str(k): str(v) for k, v in value[1]}
    return {}


def _ovs_ints(value: Any) -> tuple[int, ...]:
    """An OVSDB integer set: a bare integer, or ["set", [...]]."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return tuple(sorted(int(v) for v in value[1]))
    return ()


def _ovs_scalar(value: Any) -> Any:
    """An optional OVSDB value is an empty set (["set", []]) when unset."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return value[1][0] if value[1] else None
    return value


def kernel_datapath_available() -> bool:
    """The kernel datapath needs the openvswitch module; fall back to userspace."""
    return os.path.isdir("/sys/module/openvswitch")


class Ovs:
    def __init__(self, runner: Runner, endpoint: OvsEndpoint):
        self.run = runner
        self.endpoint = endpoint

    # --- ovsdb ---------------------------------------------------------------

    def vsctl(self, *args: str, check: bool = True) -> str:
        argv = ["ovs-vsctl", f"--db={self.endpoint.db}", "--timeout=10", *args]
        return self.run(argv, check=check).stdout

    def ofctl(self, bridge: str, *args: str, input: str | None = None) -> str:
        target = f"unix:{self.endpoint.rundir}/{bridge}.mgmt"
        argv = ["ovs-ofctl", "-O", "OpenFlow13", *args[:1], target, *args[1:]]
        return self.run(argv, input=input).stdout

    def bridges(self) -> list[str]:
        return [b for b in self.vsctl("list-br").split() if b]

    def ensure_bridge(
        self,
        name: str,
        *,
        datapath_type: DatapathType,
        secure: bool = True,
        external_ids: dict[str, str] | None = None,
    ) -> None:
        args = [
            "--may-exist",
            "add-br",
            name,
            "--",
            "set",
            "bridge",
            name,
            f"datapath_type={datapath_type}",
            "protocols=OpenFlow10,OpenFlow13",
        ]
        if secure:
            args.append("fail_mode=secure")
        for key, value in (external_ids or {}).items():
            args.append(f"external_ids:{key}={value}")
        self.vsctl(*args)

    def delete_bridge(self, name: str) -> None:
        self.vsctl("--if-exists", "del-br", name)

    def bridge_external_ids(self, bridge: str) -> dict[str, str]:
        out = self.vsctl("--format=json", "--columns=external_ids", "list", "bridge", bridge)
        rows = json.loads(out)["data"]
        return _ovs_map(rows[0][0]) if rows else {}

    def set_bridge_external_ids(self, bridge: str, values: dict[str, str | None]) -> None:
        args: list[str] = []
        for key, value in values.items():
            if value is None:
                args += ["--", "remove", "bridge", bridge, "external_ids", key]
            else:
                args += ["--", "set", "bridge", bridge, f"external_ids:{key}={value}"]
        if args:
            self.vsctl(*args[1:])

    def ensure_port(
        self,
        bridge: str,
        name: str,
        *,
        type: str | None = None,
        tag: int | None = None,
        options: dict[str, str] | None = None,
        external_ids: dict[str, str] | None = None,
        port_settings: dict[str, str] | None = None,
    ) -> None:
        """Add or update a port; existing settings not named are kept.
        `port_settings` are Port columns (vlan_mode, trunks, ...) set in the
        same transaction as the port is added, so it never exists without them."""
        args = ["--may-exist", "add-port", bridge, name]
        iface: list[str] = []
        if type:
            iface.append(f"type={type}")
        for key, value in (options or {}).items():
            iface.append(f"options:{key}={value}")
        for key, value in (external_ids or {}).items():
            iface.append(f"external_ids:{key}={value}")
        if iface:
            args += ["--", "set", "interface", name, *iface]
        port = [f"{k}={v}" for k, v in (port_settings or {}).items()]
        if tag is not None:
            port.append(f"tag={tag}")
        if port:
            args += ["--", "set", "port", name, *port]
        self.vsctl(*args)

    def add_new_port(
        self,
        bridge: str,
        name: str,
        *,
        port_settings: dict[str, str],
        external_ids: dict[str, str],
    ) -> bool:
        """Add a port with its Port columns in one transaction, only if no
        port of that name exists (ovs-vsctl fails the whole transaction then,
        leaving the existing port as it is). True when it was added."""
        iface = [f"external_ids:{k}={v}" for k, v in external_ids.items()]
        port = [f"{k}={v}" for k, v in port_settings.items()]
        args = ["add-port", bridge, name, "--", "set", "port", name, *port]
        if iface:
            args += ["--", "set", "interface", name, *iface]
        argv = ["ovs-vsctl", f"--db={self.endpoint.db}", "--timeout=10", *args]
        result = self.run(argv, check=False)
        if result.returncode == 0:
            return True
        if "already exists" in result.stderr:
            return False
        raise CommandError(argv, result.returncode, result.stdout, result.stderr)

    def set_port(self, name: str, settings: dict[str, str], clear: tuple[str, ...] = ()) -> None:
        """Set and clear Port columns of one port in one transaction."""
        args: list[str] = []
        if settings:
            args += ["--", "set", "port", name, *(f"{k}={v}" for k, v in settings.items())]
        for column in clear:
            args += ["--", "clear", "port", name, column]
        if args:
            self.vsctl(*args[1:])

    def set_tag(self, port: str, tag: int | None) -> None:
        if tag is None:
            self.vsctl("clear", "port", port, "tag")
        else:
            self.vsctl("set", "port", port, f"tag={tag}")

    def delete_port(self, bridge: str, name: str) -> None:
        self.vsctl("--if-exists", "del-port", bridge, name)

    def ports(self, bridge: str, only: tuple[str, ...] = ()) -> dict[str, OvsPort]:
        """The ports of a bridge (or just the existing ports `only`) with
        their interface settings."""
        try:
            names = self.vsctl("list-ports", bridge).split()
        except CommandError:
            return {}
        if only:
            names = [n for n in names if n in only]
        if not names:
            return {}
        out = self.vsctl(
            "--format=json",
            "--columns=name,ofport,type,external_ids,options",
            "list",
            "interface",
            *names,
        )
        tags_out = self.vsctl(
            "--format=json", "--columns=name,tag,vlan_mode,trunks", "list", "port", *names
        )
        port_rows = {row[0]: row[1:] for row in json.loads(tags_out)["data"]}
        tags = {name: _ovs_scalar(row[0]) for name, row in port_rows.items()}
        result = {}
        for name, ofport, type_, ext, opts in json.loads(out)["data"]:
            ofport_value = _ovs_scalar(ofport)
            result[name] = OvsPort(
                name=name,
                ofport=int(ofport_value) if isinstance(ofport_value, int) else -1,
                tag=tags.get(name) if isinstance(tags.get(name), int) else None,
                type=str(type_),
                external_ids=_ovs_map(ext),
                options=_ovs_map(opts),
                vlan_mode=_ovs_scalar(port_rows[name][1]) if name in port_rows else None,
                trunks=_ovs_ints(port_rows[name][2]) if name in port_rows else (),
            )
        return result

    # --- openflow --------------------------------------------------------------

    def replace_flows(self, bridge: str, flows: list[str]) -> None:
        """Make the bridge's flow table exactly `flows` (ovs-ofctl computes the diff)."""
        self.ofctl(bridge, "replace-flows", "-", input="\n".join(flows) + "\n")

    def dump_flows(self, bridge: str) -> str:
        return self.ofctl(bridge, "dump-flows")
