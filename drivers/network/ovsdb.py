"""One OVSDB connection through the `ovs` Python IDL: an in-memory replica of
the columns Nubes uses, kept current by the server's monitor updates, and
changes as transactions.

Reads cost no process and no round trip (the agent reads the switch on every
networking pass); a change is one transaction that the server applies
atomically or not at all, and like ovs-vsctl it waits until ovs-vswitchd has
applied it (`next_cfg`/`cur_cfg`), so ofports exist when it returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller
import ovs.stream
import structlog

log = structlog.get_logger()

COLUMNS: dict[str, list[str]] = {
    "Open_vSwitch": ["bridges", "next_cfg", "cur_cfg"],
    "Bridge": ["name", "ports", "external_ids", "datapath_type", "fail_mode", "protocols"],
    "Port": ["name", "interfaces", "tag", "vlan_mode", "trunks"],
    "Interface": ["name", "type", "ofport", "options", "external_ids"],
}

Tables = dict[str, Any]
"""The IDL's tables by name (rows under `.rows`)."""

Change = Callable[[Any, Tables], bool]
"""Builds a transaction from the replica: (txn, tables) -> whether ovs-vswitchd
must apply it before the call returns (bridges or ports changed)."""


class OvsdbError(Exception):
    pass


class OvsdbConnection:
    def __init__(self, remote: str, *, timeout: float = 10.0):
        self.remote = remote
        self.timeout = timeout
        self._lock = threading.RLock()
        self._idl: ovs.db.idl.Idl | None = None

    def _schema(self) -> Any:
        error, stream = ovs.stream.Stream.open_block(
            ovs.stream.Stream.open(self.remote), int(self.timeout * 1000)
        )
        if error:
            raise OvsdbError(f"cannot reach OVSDB at {self.remote}: {error}")
        rpc = ovs.jsonrpc.Connection(stream)
        try:
            error, reply = rpc.transact_block(
                ovs.jsonrpc.Message.create_request("get_schema", ["Open_vSwitch"])
            )
        finally:
            rpc.close()
        if error or reply is None or reply.error:
            raise OvsdbError(f"OVSDB at {self.remote} gave no schema: {error or reply}")
        return reply.result

    def _connected(self) -> ovs.db.idl.Idl:
        if self._idl is not None:
            return self._idl
        helper = ovs.db.idl.SchemaHelper(schema_json=self._schema())
        for table, columns in COLUMNS.items():
            helper.register_columns(table, columns)
        idl = ovs.db.idl.Idl(self.remote, helper)
        self._wait(idl, lambda: idl.has_ever_connected(), "the first replica")
        self._idl = idl
        log.debug("ovsdb connected", remote=self.remote)
        return idl

    def _wait(self, idl: ovs.db.idl.Idl, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            idl.run()
            if done():
                return
            if time.monotonic() > deadline:
                raise OvsdbError(f"OVSDB at {self.remote}: timed out waiting for {what}")
            poller = ovs.poller.Poller()
            idl.wait(poller)
            poller.timer_wait(100)
            poller.block()

    def read(self) -> Tables:
        """The replica, brought up to date with what the server has sent.
        Hold `lock` while using rows."""
        idl = self._connected()
        idl.run()
        tables: Tables = idl.tables
        return tables

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def transact(self, change: Change) -> None:
        """Run `change` in a transaction, again on a replica that had moved
        under it (TRY_AGAIN), and wait for ovs-vswitchd when it asks so."""
        with self._lock:
            idl = self._connected()
            for _ in range(20):
                idl.run()
                txn = ovs.db.idl.Transaction(idl)
                try:
                    reconfigures = change(txn, idl.tables)
                except BaseException:
                    # An open transaction would fail every later idl.run().
                    txn.abort()
                    raise
                root = next(iter(idl.tables["Open_vSwitch"].rows.values()), None)
                if reconfigures and root is not None:
                    root.increment("next_cfg")
                seqno = idl.change_seqno
                status = txn.commit_block()
                if status == ovs.db.idl.Transaction.TRY_AGAIN:
                    # Another client changed what we verified: retry on the
                    # replica once the server's update has arrived.
                    self._wait(
                        idl,
                        lambda seqno=seqno: idl.change_seqno != seqno,  # type: ignore[misc]
                        "another client's change",
                    )
                    continue
                if status not in (
                    ovs.db.idl.Transaction.SUCCESS,
                    ovs.db.idl.Transaction.UNCHANGED,
                ):
                    raise OvsdbError(f"OVSDB transaction failed: {txn.get_error() or status}")
                if reconfigures and status == ovs.db.idl.Transaction.SUCCESS:
                    wanted = txn.get_increment_new_value()
                    self._wait(
                        idl,
                        lambda wanted=wanted: _cur_cfg(idl) >= wanted,  # type: ignore[misc]
                        "ovs-vswitchd",
                    )
                return
            raise OvsdbError("OVSDB transaction kept conflicting with other clients")

    def close(self) -> None:
        with self._lock:
            if self._idl is not None:
                self._idl.close()
                self._idl = None


def _cur_cfg(idl: ovs.db.idl.Idl) -> int:
    root = next(iter(idl.tables["Open_vSwitch"].rows.values()), None)
    return int(root.cur_cfg) if root is not None else 0


def find(tables: Tables, table: str, name: str) -> Any | None:
    """The row of `table` named `name` (names are unique in these tables)."""
    return next((r for r in tables[table].rows.values() if r.name == name), None)
