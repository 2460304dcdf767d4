"""The compute node's side of an iSCSI attachment, chosen per node.

Two ways in:
- kernel: the node has the iscsi_tcp module (loaded or loadable) and a
  working iscsiadm; `IscsiadmInitiator` logs in (node new, CHAP update,
  login, rescan) and hands back a block device under /dev/disk/by-path; on
  detach it flushes the device, deletes the SCSI device, logs out and
  deletes the node record.
- qemu: no kernel initiator (as on the project machines); the guest's disk
  is a libvirt `<disk type='network'><source protocol='iscsi'>` and QEMU's
  own initiator (qemu-block-extra) logs in. `QemuInitiator` does nothing on
  the host and returns the connection for the domain XML.

`detect_initiator` decides by asking the node, never by assumption.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from nubes.drivers.iscsi.connection import IscsiConnection
from nubes.drivers.runner import Result, Runner, redact
from nubes.drivers.volumes.base import StorageError

log = structlog.get_logger()

# iscsiadm exit codes (open-iscsi include/iscsi_err.h)
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_NO_OBJS_FOUND = 21


class AttachMode(StrEnum):
    KERNEL = "kernel"
    QEMU = "qemu"


class AttachError(StorageError):
    pass


@dataclass(frozen=True)
class InitiatorSupport:
    mode: AttachMode
    reason: str
    """Why this mode, in words for the node's status."""
    initiator_name: str | None = None
    """This node's IQN from /etc/iscsi/initiatorname.iscsi, when set."""
    module_loaded: bool = False


def detect_initiator(
    runner: Runner,
    *,
    sys_module_dir: str = "/sys/module",
    initiator_name_file: str = "/etc/iscsi/initiatorname.iscsi",
) -> InitiatorSupport:
    """KERNEL only when iscsiadm runs and iscsi_tcp is loaded or loadable."""
    name = _initiator_name(initiator_name_file)
    try:
        version = runner(["iscsiadm", "--version"], check=False)
    except OSError as e:
        return InitiatorSupport(AttachMode.QEMU, f"iscsiadm not usable: {e}", name)
    if version.returncode != 0:
        return InitiatorSupport(AttachMode.QEMU, f"iscsiadm not usable: {_words(version)}", name)
    if Path(sys_module_dir, "iscsi_tcp").exists():
        return InitiatorSupport(AttachMode.KERNEL, "iscsi_tcp loaded", name, module_loaded=True)
    probe = runner(["modprobe", "--dry-run", "iscsi_tcp"], check=False)
    if probe.returncode != 0:
        return InitiatorSupport(
            AttachMode.QEMU,
            f"no kernel iSCSI initiator ({_words(probe)}); QEMU's initiator attaches volumes",
            name,
        )
    if name is None:
        return InitiatorSupport(
            AttachMode.QEMU, f"{initiator_name_file} has no InitiatorName", name
        )
    return InitiatorSupport(AttachMode.KERNEL, "iscsi_tcp loadable", name)


def _initiator_name(path: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip() or None
    except OSError:
        return None
    return None


def _words(result: Result) -> str:
    return (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}")[:300]


@dataclass(frozen=True)
class BlockDeviceAttachment:
    """Kernel initiator: the volume is a block device on the host."""

    connection: IscsiConnection
    device_path: str


@dataclass(frozen=True)
class NetworkDiskAttachment:
    """QEMU initiator: put `connection.libvirt_disk(...)` into the domain."""

    connection: IscsiConnection


Attachment = BlockDeviceAttachment | NetworkDiskAttachment


class IscsiadmInitiator:
    mode = AttachMode.KERNEL

    def __init__(
        self,
        runner: Runner,
        *,
        by_path_dir: str = "/dev/disk/by-path",
        sys_dir: str = "/sys",
        device_timeout: float = 30,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.runner = runner
        self.by_path_dir = by_path_dir
        self.sys_dir = sys_dir
        self.device_timeout = device_timeout
        self.sleep = sleep

    def device_path(self, conn: IscsiConnection) -> str:
        return os.path.join(self.by_path_dir, f"ip-{conn.portal}-iscsi-{conn.iqn}-lun-{conn.lun}")

    def _node(self, conn: IscsiConnection, *args: str, ok: tuple[int, ...] = ()) -> Result:
        argv = ["iscsiadm", "-m", "node", "-T", conn.iqn, "-p", conn.portal, *args]
        result = self.runner(argv, check=False, timeout=120)
        if result.returncode not in (0, *ok):
            shown = " ".join(redact(args))
            raise AttachError(f"iscsiadm {shown} for {conn.iqn}: {_words(result)}")
        return result

    def connect(self, conn: IscsiConnection) -> BlockDeviceAttachment:
        """Log in (idempotent: an existing session is kept) and wait for the device."""
        if not Path(self.sys_dir, "module", "iscsi_tcp").exists():
            self.runner(["modprobe", "iscsi_tcp"])
        self._node(conn, "--interface", "default", "--op", "new")
        if conn.chap is not None:
            # iscsiadm takes a node setting's value only on its command line
            # (`-o update -n KEY -v VALUE`), so the password is in this short
            # process's /proc/<pid>/cmdline (hidepid=invisible hides it from
            # non-root processes); logs and errors mask it. Guests do not use
            # this path: QEMU's own initiator gets CHAP from a libvirt secret.
            for key, value in (
                ("node.session.auth.authmethod", "CHAP"),
                ("node.session.auth.username", conn.chap.username),
                ("node.session.auth.password", conn.chap.password),
            ):
                self._node(conn, "--op", "update", "-n", key, "-v", value)
        self._node(conn, "--login", ok=(ISCSI_ERR_SESS_EXISTS,))
        self._node(conn, "--rescan")
        device = self.device_path(conn)
        deadline = time.monotonic() + self.device_timeout
        while not os.path.exists(device):
            if time.monotonic() > deadline:
                raise AttachError(f"{device} did not appear within {self.device_timeout}s")
            self.sleep(0.2)
        log.info("iscsi attached", iqn=conn.iqn, device=device)
        return BlockDeviceAttachment(conn, device)

    def disconnect(self, conn: IscsiConnection) -> None:
        """Flush, drop the SCSI device, log out, forget the node; no-op when gone."""
        device = self.device_path(conn)
        if os.path.exists(device):
            real = os.path.realpath(device)
            self.runner(["blockdev", "--flushbufs", real])
            delete = Path(self.sys_dir, "block", os.path.basename(real), "device", "delete")
            if delete.exists():
                delete.write_text("1\n")
        self._node(conn, "--logout", ok=(ISCSI_ERR_NO_OBJS_FOUND,))
        self._node(conn, "--op", "delete", ok=(ISCSI_ERR_NO_OBJS_FOUND,))
        log.info("iscsi detached", iqn=conn.iqn)


class QemuInitiator:
    """Nothing to do on the host: QEMU logs in itself when the disk is attached."""

    mode = AttachMode.QEMU

    def connect(self, conn: IscsiConnection) -> NetworkDiskAttachment:
        return NetworkDiskAttachment(conn)

    def disconnect(self, conn: IscsiConnection) -> None:
        return None


def initiator_for(
    runner: Runner, support: InitiatorSupport | None = None
) -> IscsiadmInitiator | QemuInitiator:
    support = support or detect_initiator(runner)
    log.info("iscsi initiator", mode=support.mode.value, reason=support.reason)
    if support.mode is AttachMode.KERNEL:
        return IscsiadmInitiator(runner)
    return QemuInitiator()
