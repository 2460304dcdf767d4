"""Export volumes as iSCSI targets through tgtd (`tgtadm --lld iscsi`).

One target per volume, IQN `<prefix>volume-<volume id>`, LUN 1 backed by the
volume's file or device, one incoming CHAP account bound to it, and an ACL of
initiator addresses. tgtd keeps all of this in memory only, so the truth is
what `tgtadm --op show --mode target` says: every call reads it, converges
towards the request and is safe to repeat, and after an agent or tgtd
restart `ensure_export` simply rebuilds what is missing.

tgtd is shared by everything on the node, so target ids are picked as one
above the highest in use and a clash (another writer won the id) is retried.

CHAP passwords travel in tgtadm's argv: tgtadm takes `--password` only on
its command line (no file, stdin or environment form; tgt-admin and
targets.conf end in the same tgtadm call), and tgtd's management socket
speaks an unversioned internal struct we do not reimplement. The password is
therefore in /proc/<pid>/cmdline for the milliseconds tgtadm runs; mounting
/proc with `hidepid=invisible` keeps it from non-root processes (QEMU runs as
libvirt-qemu). Logs and errors show it masked (`redact`). tgtd cannot show
passwords back, so the caller keeps them and this driver re-sets an account
whenever it has not set that exact password itself since it started.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from nubes.drivers.iscsi.connection import ChapCredentials, IscsiConnection
from nubes.drivers.runner import CommandError, Runner, redact
from nubes.drivers.volumes.base import InvalidId, StorageError

log = structlog.get_logger()

IQN_PREFIX = "iqn.2010-10.io.nubes:"
LUN = 1
_IQN_ID = re.compile(r"^[a-z0-9][a-z0-9.-]{0,99}$")
_TID_RETRIES = 20


class ExportError(StorageError):
    """tgtd refused a change; the message carries tgtadm's words."""

    reason = "ExportFailed"


def iqn_for(volume_id: str, prefix: str = IQN_PREFIX) -> str:
    """IQNs are lowercase letters, digits, '.', '-' and ':' (RFC 3720)."""
    if not _IQN_ID.fullmatch(volume_id):
        raise InvalidId("volume (for an IQN)", volume_id)
    return f"{prefix}volume-{volume_id}"


@dataclass(frozen=True)
class TargetState:
    """One target as `tgtadm --op show --mode target` reports it."""

    tid: int
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)
    """LUN number to backing store path (LUN 0 is the controller: absent)."""
    accounts: tuple[str, ...] = ()
    """Incoming CHAP accounts bound to the target."""
    initiators: tuple[str, ...] = ()
    """ACL: initiator addresses (or ALL) allowed to log in."""
    sessions: int = 0
    """Open I_T nexuses (logged-in initiators)."""


@dataclass(frozen=True)
class Export:
    volume_id: str
    target: TargetState

    @property
    def backing_path(self) -> str | None:
        return self.target.luns.get(LUN)


@dataclass
class _Builder:
    tid: int
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)
    accounts: list[str] = field(default_factory=list)
    initiators: list[str] = field(default_factory=list)
    sessions: int = 0

    def build(self) -> TargetState:
        return TargetState(
            self.tid,
            self.iqn,
            self.luns,
            tuple(self.accounts),
            tuple(self.initiators),
            self.sessions,
        )


def parse_targets(text: str) -> list[TargetState]:
    """Parse tgtadm's human-readable target listing (it has no other format).

    Sections are the 4-space-indented headers ("LUN information:", ...);
    what follows them, indented deeper, belongs to that section.
    """
    built: list[_Builder] = []
    section = ""
    lun: int | None = None
    for raw in text.splitlines():
        line = raw.strip()
        head = re.match(r"^Target (\d+): (\S+)$", raw)
        if head:
            built.append(_Builder(int(head.group(1)), head.group(2)))
            section, lun = "", None
            continue
        if not built or not line:
            continue
        t = built[-1]
        if raw.startswith("    ") and not raw.startswith("     ") and line.endswith(":"):
            section = line[:-1]
        elif section == "I_T nexus information" and line.startswith("I_T nexus:"):
            t.sessions += 1
        elif section == "LUN information" and line.startswith("LUN:"):
            lun = int(line.split(":", 1)[1])
        elif section == "LUN information" and line.startswith("Backing store path:"):
            path = line.split(":", 1)[1].strip()
            if lun is not None and path and path != "None":
                t.luns[lun] = path
        elif section == "Account information" and not line.endswith("(outgoing)"):
            t.accounts.append(line)
        elif section == "ACL information":
            t.initiators.append(line)
    return [b.build() for b in built]


class TgtExporter:
    """Idempotent iSCSI exports of volumes on this node's tgtd."""

    def __init__(
        self,
        runner: Runner,
        *,
        portal_host: str,
        portal_port: int = 3260,
        iqn_prefix: str = IQN_PREFIX,
    ) -> None:
        self.runner = runner
        self.portal_host = portal_host
        self.portal_port = portal_port
        self.iqn_prefix = iqn_prefix
        # username -> digest of the password this process last gave tgtd.
        self._accounts_set: dict[str, str] = {}

    # --- reading ------------------------------------------------------------------

    def _tgtadm(self, *args: str, check: bool = True) -> str:
        try:
            return self.runner(["tgtadm", "--lld", "iscsi", *args], check=check).stdout
        except CommandError as e:
            raise ExportError(f"tgtadm {' '.join(redact(args))}: {e.stderr.strip()}") from e

    def targets(self) -> list[TargetState]:
        """Every target tgtd has, ours or not."""
        return parse_targets(self._tgtadm("--op", "show", "--mode", "target"))

    def list_exports(self) -> list[Export]:
        """Our targets (by IQN prefix), read back from tgtd."""
        prefix = f"{self.iqn_prefix}volume-"
        return [
            Export(volume_id=t.iqn[len(prefix) :], target=t)
            for t in self.targets()
            if t.iqn.startswith(prefix)
        ]

    def get_export(self, volume_id: str) -> Export | None:
        iqn = iqn_for(volume_id, self.iqn_prefix)
        return next((e for e in self.list_exports() if e.target.iqn == iqn), None)

    def connection(self, volume_id: str, chap: ChapCredentials | None) -> IscsiConnection:
        return IscsiConnection(
            portal_host=self.portal_host,
            portal_port=self.portal_port,
            iqn=iqn_for(volume_id, self.iqn_prefix),
            lun=LUN,
            chap=chap,
        )

    # --- converging ---------------------------------------------------------------

    def ensure_export(
        self,
        volume_id: str,
        backing_path: str,
        *,
        chap: ChapCredentials,
        initiators: Sequence[str],
    ) -> IscsiConnection:
        """Export backing_path as LUN 1 of the volume's target, CHAP required,
        only to the given initiator addresses ("ALL" allows any address)."""
        if not initiators:
            raise ExportError(f"export of volume {volume_id} needs at least one initiator address")
        iqn = iqn_for(volume_id, self.iqn_prefix)
        target = self._ensure_target(iqn)
        changed = [
            self._ensure_lun(target, backing_path),
            self._ensure_account(target, chap),
            self._ensure_acl(target, initiators),
        ]
        # Called on every resync: only changes are news.
        (log.info if any(changed) else log.debug)(
            "volume exported",
            volume=volume_id,
            iqn=iqn,
            tid=target.tid,
            path=backing_path,
            initiators=list(initiators),
        )
        return self.connection(volume_id, chap)

    def remove_export(self, volume_id: str) -> None:
        """Delete the target (even with sessions) and its accounts; no-op when gone."""
        export = self.get_export(volume_id)
        if export is None:
            return
        tid = str(export.target.tid)
        try:
            self._tgtadm("--op", "delete", "--mode", "target", "--force", "--tid", tid)
        except ExportError as e:
            if "can't find the target" not in str(e):
                raise
        for user in export.target.accounts:
            self._delete_account(user)
        log.info("export removed", volume=volume_id, tid=export.target.tid)

    def remove_exports_of(self, volume_ids: Iterable[str]) -> list[str]:
        """Remove the exports of these volumes that exist (stale ones after a
        restart, say); returns the volume ids whose export was removed. The
        caller names the volumes: one tgtd may serve several agents."""
        stale = set(volume_ids)
        removed = [e.volume_id for e in self.list_exports() if e.volume_id in stale]
        for volume_id in removed:
            self.remove_export(volume_id)
        return removed

    def _ensure_target(self, iqn: str) -> TargetState:
        for _ in range(_TID_RETRIES):
            targets = self.targets()
            mine = next((t for t in targets if t.iqn == iqn), None)
            if mine is not None:
                return mine
            tid = max((t.tid for t in targets), default=0) + 1
            try:
                self._tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
            except ExportError as e:
                if "already exists" in str(e):
                    continue  # another writer took the id (or made this IQN): look again
                raise
            return TargetState(tid=tid, iqn=iqn)
        raise ExportError(f"no free target id for {iqn} after {_TID_RETRIES} tries")

    def _ensure_lun(self, target: TargetState, backing_path: str) -> bool:
        tid = str(target.tid)
        current = target.luns.get(LUN)
        if current == backing_path:
            return False
        if current is not None:
            log.warning("re-pointing LUN", iqn=target.iqn, old=current, new=backing_path)
            self._tgtadm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", str(LUN))
        self._tgtadm(
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            tid,
            "--lun",
            str(LUN),
            "--backing-store",
            backing_path,
        )
        return True

    def _ensure_account(self, target: TargetState, chap: ChapCredentials) -> bool:
        tid = str(target.tid)
        digest = hashlib.sha256(f"{chap.username}\0{chap.password}".encode()).hexdigest()
        for other in target.accounts:
            if other != chap.username:
                self._delete_account(other)  # one account per target: ours
        if chap.username in target.accounts and self._accounts_set.get(chap.username) == digest:
            return False
        # tgtd cannot update a password nor show it: delete (which unbinds) and add.
        self._delete_account(chap.username)
        self._tgtadm(
            "--op",
            "new",
            "--mode",
            "account",
            "--user",
            chap.username,
            "--password",
            chap.password,
        )
        self._tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", chap.username)
        self._accounts_set[chap.username] = digest
        return True

    def _delete_account(self, user: str) -> None:
        self._accounts_set.pop(user, None)
        try:
            self._tgtadm("--op", "delete", "--mode", "account", "--user", user)
        except ExportError as e:
            if "can't find the account" not in str(e):
                raise

    def _ensure_acl(self, target: TargetState, initiators: Sequence[str]) -> bool:
        tid = str(target.tid)
        have, want = set(target.initiators), set(initiators)
        for address in sorted(want - have):
            self._tgtadm(
                "--op", "bind", "--mode", "target", "--tid", tid, "--initiator-address", address
            )
        for address in sorted(have - want):
            self._tgtadm(
                "--op", "unbind", "--mode", "target", "--tid", tid, "--initiator-address", address
            )
        return have != want
