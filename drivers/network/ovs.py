"""A narrow client for one Open vSwitch instance: OVSDB through the `ovs`
IDL (drivers/network/ovsdb.py), OpenFlow through ovs-ofctl (Python has no
maintained OpenFlow client, and `replace-flows` computes the minimal diff
for us).

Every instance names its database socket and bridge management directory
explicitly, so several switches (one per simulated node) can live on one
machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from nubes.drivers.network.ovsdb import OvsdbConnection, OvsdbError, Tables, find
from nubes.drivers.runner import Runner

DatapathType = Literal["system", "netdev"]

FLOWS_RECHECK = 20.0


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


def _optional(value: Any) -> Any:
    """An optional OVSDB column reads as a list of zero or one value."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _port_column(column: str, value: str) -> Any:
    """Port settings are given as ovs-vsctl spells them ("4095", "1,2")."""
    if column == "tag":
        return [int(value)] if value else []
    if column == "trunks":
        return sorted(int(v) for v in value.split(",") if v)
    if column == "vlan_mode":
        return [value] if value else []
    raise ValueError(f"unsupported Port column {column}")


def kernel_datapath_available() -> bool:
    """The kernel datapath needs the openvswitch module; fall back to userspace."""
    return os.path.isdir("/sys/module/openvswitch")


class _Changes:
    """Writes to rows only where the value differs, remembering whether
    anything was written (an unchanged switch costs no transaction)."""

    def __init__(self, txn: Any, tables: Tables):
        self.txn = txn
        self.tables = tables
        self.changed = False

    def set(self, row: Any, column: str, value: Any) -> None:
        # A row inserted in this transaction has no value yet to compare.
        if getattr(row, column, None) != value:
            setattr(row, column, value)
            self.changed = True

    def merge(self, row: Any, column: str, values: dict[str, str]) -> None:
        current = getattr(row, column, None)
        if current is None:
            if values:
                setattr(row, column, dict(values))
                self.changed = True
            return
        for key, value in values.items():
            if current.get(key) != value:
                row.setkey(column, key, value)
                self.changed = True

    def insert(self, table: str, **columns: Any) -> Any:
        row = self.txn.insert(self.tables[table])
        for column, value in columns.items():
            setattr(row, column, value)
        self.changed = True
        return row


class Ovs:
    def __init__(self, runner: Runner, endpoint: OvsEndpoint):
        self.run = runner
        self.endpoint = endpoint
        self.db = OvsdbConnection(endpoint.db)
        self._flows: dict[str, tuple[str, float]] = {}
        """Flow table last sent per bridge, and when."""

    def _change(self, build: Any) -> None:
        def change(txn: Any, tables: Tables) -> bool:
            changes = _Changes(txn, tables)
            build(changes)
            return changes.changed

        self.db.transact(change)

    def _bridge(self, tables: Tables, name: str) -> Any:
        bridge = find(tables, "Bridge", name)
        if bridge is None:
            raise OvsdbError(f"no bridge named {name}")
        return bridge

    # --- ovsdb ---------------------------------------------------------------

    def ofctl(self, bridge: str, *args: str, input: str | None = None) -> str:
        target = f"unix:{self.endpoint.rundir}/{bridge}.mgmt"
        argv = ["ovs-ofctl", "-O", "OpenFlow13", *args[:1], target, *args[1:]]
        return self.run(argv, input=input).stdout

    def bridges(self) -> list[str]:
        with self.db.lock:
            return sorted(b.name for b in self.db.read()["Bridge"].rows.values())

    def ensure_bridge(
        self,
        name: str,
        *,
        datapath_type: DatapathType,
        secure: bool = True,
        external_ids: dict[str, str] | None = None,
    ) -> None:
        def build(c: _Changes) -> None:
            bridge = find(c.tables, "Bridge", name)
            if bridge is None:
                # As ovs-vsctl add-br: the bridge's own internal port.
                iface = c.insert("Interface", name=name, type="internal")
                port = c.insert("Port", name=name, interfaces=[iface])
                bridge = c.insert("Bridge", name=name, ports=[port])
                root = next(iter(c.tables["Open_vSwitch"].rows.values()))
                root.addvalue("bridges", bridge.uuid)
            c.set(bridge, "datapath_type", datapath_type)
            c.set(bridge, "protocols", ["OpenFlow10", "OpenFlow13"])
            if secure:
                c.set(bridge, "fail_mode", ["secure"])
            c.merge(bridge, "external_ids", external_ids or {})

        self._change(build)

    def delete_bridge(self, name: str) -> None:
        def build(c: _Changes) -> None:
            bridge = find(c.tables, "Bridge", name)
            if bridge is not None:
                root = next(iter(c.tables["Open_vSwitch"].rows.values()))
                root.delvalue("bridges", bridge.uuid)
                c.changed = True

        self._change(build)

    def bridge_external_ids(self, bridge: str) -> dict[str, str]:
        with self.db.lock:
            row = find(self.db.read(), "Bridge", bridge)
            return dict(row.external_ids) if row is not None else {}

    def set_bridge_external_ids(self, bridge: str, values: dict[str, str | None]) -> None:
        def build(c: _Changes) -> None:
            row = self._bridge(c.tables, bridge)
            for key, value in values.items():
                if value is None:
                    if key in row.external_ids:
                        row.delkey("external_ids", key)
                        c.changed = True
                elif row.external_ids.get(key) != value:
                    row.setkey("external_ids", key, value)
                    c.changed = True

        self._change(build)

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

        def build(c: _Changes) -> None:
            port = find(c.tables, "Port", name)
            if port is None:
                iface = c.insert("Interface", name=name)
                port = c.insert("Port", name=name, interfaces=[iface])
                self._bridge(c.tables, bridge).addvalue("ports", port.uuid)
            iface = port.interfaces[0]
            if type:
                c.set(iface, "type", type)
            c.merge(iface, "options", options or {})
            c.merge(iface, "external_ids", external_ids or {})
            for column, value in (port_settings or {}).items():
                c.set(port, column, _port_column(column, value))
            if tag is not None:
                c.set(port, "tag", [tag])

        self._change(build)

    def add_new_port(
        self,
        bridge: str,
        name: str,
        *,
        port_settings: dict[str, str],
        external_ids: dict[str, str],
    ) -> bool:
        """Add a port with its Port columns in one transaction, only if no
        port of that name exists (an existing one is left as it is). True
        when it was added."""
        added = False

        def build(c: _Changes) -> None:
            nonlocal added
            added = False
            row = self._bridge(c.tables, bridge)
            # Verified: a port another client adds meanwhile makes the
            # transaction retry on the new replica, which then has it.
            row.verify("ports")
            if find(c.tables, "Port", name) is not None:
                return
            iface = c.insert("Interface", name=name, external_ids=external_ids)
            settings = {k: _port_column(k, v) for k, v in port_settings.items()}
            port = c.insert("Port", name=name, interfaces=[iface], **settings)
            row.addvalue("ports", port.uuid)
            added = True

        self._change(build)
        return added

    def set_port(self, name: str, settings: dict[str, str], clear: tuple[str, ...] = ()) -> None:
        """Set and clear Port columns of one port in one transaction; a port
        that is gone (removed since the caller read the switch) is left gone."""

        def build(c: _Changes) -> None:
            port = find(c.tables, "Port", name)
            if port is None:
                return
            for column, value in settings.items():
                c.set(port, column, _port_column(column, value))
            for column in clear:
                c.set(port, column, [])

        self._change(build)

    def set_tag(self, port: str, tag: int | None) -> None:
        self.set_port(port, {"tag": str(tag)} if tag is not None else {}, () if tag else ("tag",))

    def delete_port(self, bridge: str, name: str) -> None:
        def build(c: _Changes) -> None:
            row = find(c.tables, "Bridge", bridge)
            port = find(c.tables, "Port", name)
            if row is not None and port is not None and port in row.ports:
                row.delvalue("ports", port.uuid)
                c.changed = True

        self._change(build)

    def ports(self, bridge: str, only: tuple[str, ...] = ()) -> dict[str, OvsPort]:
        """The ports of a bridge (or just the existing ports `only`) with
        their interface settings."""
        with self.db.lock:
            row = find(self.db.read(), "Bridge", bridge)
            if row is None:
                return {}
            result = {}
            for port in row.ports:
                if port.name == bridge or (only and port.name not in only) or not port.interfaces:
                    continue
                iface = port.interfaces[0]
                ofport = _optional(iface.ofport)
                result[port.name] = OvsPort(
                    name=port.name,
                    ofport=int(ofport) if isinstance(ofport, int) else -1,
                    tag=_optional(port.tag),
                    type=str(iface.type),
                    external_ids=dict(iface.external_ids),
                    options=dict(iface.options),
                    vlan_mode=_optional(port.vlan_mode),
                    trunks=tuple(sorted(port.trunks)),
                )
            return result

    # --- openflow --------------------------------------------------------------

    def replace_flows(self, bridge: str, flows: list[str]) -> None:
        """Make the bridge's flow table exactly `flows` (ovs-ofctl computes the
        diff). The same table as last time is not sent again for a while: a
        process per bridge and pass was most of a pass's CPU; drift (a
        restarted ovs-vswitchd, a hand-made flow) is repaired within
        FLOWS_RECHECK seconds."""
        text = "\n".join(flows) + "\n"
        last = self._flows.get(bridge)
        if last is not None and last[0] == text and time.monotonic() - last[1] < FLOWS_RECHECK:
            return
        self.ofctl(bridge, "replace-flows", "-", input=text)
        self._flows[bridge] = (text, time.monotonic())

    def dump_flows(self, bridge: str) -> str:
        return self.ofctl(bridge, "dump-flows")
