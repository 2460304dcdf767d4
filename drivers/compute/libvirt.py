"""The libvirt compute driver: narrow, idempotent verbs on one node's domains.

Every verb succeeds when its result already holds (starting a running
domain, undefining an absent one, attaching a disk that is attached), so the
agent can repeat any of them after a crash or a lost reply. Domains are found
by name; the ones Nubes owns carry its metadata element (see domain.py), and
a domain of the same name without it, or with another UUID, is never touched.

Calls block (libvirt-python is synchronous): run them in a worker thread.
Nova's terms map as: pause/unpause keep the guest in memory (state paused);
suspend/resume save it to disk with libvirt's managed save (state shut off
with a saved image; `start` also restores it).

(About 550 lines: one idempotent verb per domain operation, each short;
split by operation they would repeat the lookup and error handling.)
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import libvirt
import structlog

from nubes.drivers.compute.domain import (
    METADATA_NS,
    DataDisk,
    DomainSpec,
    Owner,
    disk_xml,
    domain_xml,
    iscsi_secret_xml,
)
from nubes.drivers.problem import Failure

log = structlog.get_logger()

DEFAULT_URI = "qemu:///system"


class DomainState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    SAVED = "shutoff-with-managed-save"
    ABSENT = "absent"


class ComputeError(Failure):
    """Base of the driver's errors; `str(e)` is a message for people."""

    reason = "ComputeFailed"


class DomainNotFound(ComputeError):
    reason = "DomainNotFound"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"domain {name} does not exist")


class DomainConflict(ComputeError):
    reason = "DomainConflict"


class InvalidState(ComputeError):
    reason = "InvalidState"

    def __init__(self, name: str, state: DomainState, verb: str) -> None:
        self.state = state
        super().__init__(f"cannot {verb} domain {name}: it is {state}")


class DeviceBusy(ComputeError):
    """A live detach the guest did not complete in time (repeat later)."""

    reason = "DetachTimeout"


class LibvirtFailure(ComputeError):
    reason = "LibvirtFailed"


@dataclass(frozen=True)
class ObservedDomain:
    name: str
    uuid: str
    state: DomainState
    owner: Owner | None
    disk_targets: tuple[str, ...] = ()
    """Targets of the disks attached now (live when running, else persistent)."""


@dataclass(frozen=True)
class ShutdownResult:
    graceful: bool
    """True when the guest powered off by itself (ACPI), False when destroyed."""
    seconds: float


def _code(e: libvirt.libvirtError) -> int:
    code: int = e.get_error_code()
    return code


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes them."""


class LibvirtCompute:
    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.uri = uri
        self.poll_interval = poll_interval
        self._clock = clock
        self._sleep = sleep
        self._conn: Any = None
        self._conn_lock = threading.Lock()

    # --- connection and lookup ----------------------------------------------------

    def connection(self) -> Any:
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            libvirt.registerErrorHandler(_quiet, None)
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise LibvirtFailure(f"cannot connect to {self.uri}: {e}") from e
            return self._conn

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def _lookup(self, name: str) -> Any | None:
        try:
            return self.connection().lookupByName(name)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtFailure(f"looking up domain {name}: {e}") from e

    def _require(self, name: str) -> Any:
        dom = self._lookup(name)
        if dom is None:
            raise DomainNotFound(name)
        return dom

    # --- observation -----------------------------------------------------------------

    def state(self, name: str) -> DomainState:
        dom = self._lookup(name)
        return DomainState.ABSENT if dom is None else _state_of(dom)

    def observe(self, name: str) -> ObservedDomain:
        dom = self._lookup(name)
        if dom is None:
            return ObservedDomain(name, "", DomainState.ABSENT, None)
        return _observe(dom)

    def list_owned(self) -> list[ObservedDomain]:
        """Every domain on this node that carries the Nubes metadata, by name."""
        found = []
        for dom in self.connection().listAllDomains(0):
            try:
                observed = _observe(dom)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we looked
                raise
            if observed.owner is not None:
                found.append(observed)
        return sorted(found, key=lambda d: d.name)

    # --- definition ------------------------------------------------------------------

    def ensure_defined(self, spec: DomainSpec) -> bool:
        """Define the domain, or update its persistent definition.

        A running domain keeps its live configuration until it next starts.
        Returns whether the persistent definition changed.
        """
        xml = domain_xml(spec)
        conn = self.connection()
        dom = self._lookup(spec.name)
        before = None
        if dom is not None:
            if dom.UUIDString() != spec.uuid:
                raise DomainConflict(
                    f"domain {spec.name} exists with UUID {dom.UUIDString()}, not {spec.uuid}"
                )
            if _owner(dom) is None:
                raise DomainConflict(f"domain {spec.name} exists and is not managed by Nubes")
            before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        else:
            try:
                other = conn.lookupByUUIDString(spec.uuid)
            except libvirt.libvirtError:
                other = None
            if other is not None:
                raise DomainConflict(f"UUID {spec.uuid} belongs to domain {other.name()}")
        try:
            dom = conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"defining domain {spec.name}: {e}") from e
        after: str = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        changed = before != after
        if changed:
            log.info("domain defined", domain=spec.name, new=before is None)
        return changed

    def undefine(self, name: str) -> None:
        """Power off and remove the domain with its managed save image and
        NVRAM; succeeds when it is already gone."""
        dom = self._lookup(name)
        if dom is None:
            return
        self._check_owned(dom, name)
        if dom.isActive():
            self._destroy(dom)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError as e:
            if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtFailure(f"undefining domain {name}: {e}") from e
        log.info("domain undefined", domain=name)

    # --- power -------------------------------------------------------------------------

    def start(self, name: str, *, paused: bool = False) -> None:
        """Boot a shut-off domain, or restore a suspended one; no-op when active.
        `paused`: QEMU is set up but the guest's CPUs wait for `unpause`."""
        dom = self._require(name)
        if dom.isActive():
            return
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        except libvirt.libvirtError as e:
            if dom.isActive():
                return
            raise LibvirtFailure(f"starting domain {name}: {e}") from e
        log.info("domain started", domain=name, paused=paused)

    def shutdown(
        self, name: str, *, timeout: float = 60, retry_interval: float = 10
    ) -> ShutdownResult:
        """Press the ACPI power button (again every `retry_interval`, as a
        guest still booting can miss it); destroy after `timeout`.

        A paused guest cannot react, so it is destroyed at once. Shutting
        down a suspended (saved) domain discards its saved state.
        """
        started = self._clock()
        dom = self._lookup(name)
        if dom is None:
            return ShutdownResult(True, 0)
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)
        state = _state_of(dom)
        if state in (DomainState.SHUTOFF, DomainState.SAVED):
            return ShutdownResult(True, 0)
        if state == DomainState.RUNNING:
            deadline = started + timeout
            next_press = started
            while self._clock() < deadline:
                if self._clock() >= next_press:
                    try:
                        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                    except libvirt.libvirtError:
                        if not dom.isActive():
                            break
                    next_press = self._clock() + retry_interval
                if not dom.isActive():
                    break
                self._sleep(self.poll_interval)
            if not dom.isActive():
                seconds = self._clock() - started
                log.info("domain shut down", domain=name, seconds=round(seconds, 1))
                return ShutdownResult(True, seconds)
        self._destroy(dom)
        seconds = self._clock() - started
        log.info("domain destroyed", domain=name, after=round(seconds, 1), was=str(state))
        return ShutdownResult(False, seconds)

    def destroy(self, name: str) -> None:
        """Pull the plug; no-op when not running."""
        dom = self._lookup(name)
        if dom is not None and dom.isActive():
            self._destroy(dom)

    def _destroy(self, dom: Any) -> None:
        try:
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        except libvirt.libvirtError:
            # Graceful means SIGTERM only; a wedged QEMU needs SIGKILL.
            if dom.isActive():
                try:
                    dom.destroy()
                except libvirt.libvirtError as e:
                    if dom.isActive():
                        raise LibvirtFailure(f"destroying domain {dom.name()}: {e}") from e

    def reboot(self, name: str, *, hard: bool = False) -> None:
        """Soft: ACPI power button, and libvirt restarts the guest when it
        powers off (the domain must be running). Hard: power cycle, which
        also applies a changed definition; a shut-off domain just starts."""
        dom = self._require(name)
        state = _state_of(dom)
        if hard:
            if dom.isActive():
                self._destroy(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            self.start(name)
            log.info("domain hard rebooted", domain=name)
            return
        if state != DomainState.RUNNING:
            raise InvalidState(name, state, "soft reboot")
        try:
            dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"rebooting domain {name}: {e}") from e
        log.info("domain soft reboot requested", domain=name)

    def pause(self, name: str) -> None:
        """Stop the vCPUs, keeping the guest in memory; no-op when paused."""
        dom = self._require(name)
        state = _state_of(dom)
        if state == DomainState.PAUSED:
            return
        if state != DomainState.RUNNING:
            raise InvalidState(name, state, "pause")
        dom.suspend()
        log.info("domain paused", domain=name)

    def unpause(self, name: str) -> None:
        dom = self._require(name)
        state = _state_of(dom)
        if state == DomainState.RUNNING:
            return
        if state != DomainState.PAUSED:
            raise InvalidState(name, state, "unpause")
        dom.resume()
        log.info("domain unpaused", domain=name)

    def suspend(self, name: str) -> None:
        """Save the guest's memory to disk and stop QEMU (managed save)."""
        dom = self._require(name)
        state = _state_of(dom)
        if state == DomainState.SAVED:
            return
        if state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise InvalidState(name, state, "suspend")
        try:
            dom.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"suspending domain {name}: {e}") from e
        log.info("domain suspended", domain=name)

    def resume(self, name: str) -> None:
        """Restore a suspended guest; no-op when it is running."""
        dom = self._require(name)
        state = _state_of(dom)
        if state == DomainState.RUNNING:
            return
        if state != DomainState.SAVED:
            raise InvalidState(name, state, "resume")
        self.start(name)

    # --- disks ------------------------------------------------------------------------

    def attach_disk(self, name: str, disk: DataDisk) -> bool:
        """Attach to the live guest (hotplug) and the persistent definition.

        Returns False when the target was attached already.
        """
        dom = self._require(name)
        xml = disk_xml(disk)
        flags = 0
        active = dom.isActive()
        if active and disk.target not in _disk_targets(dom.XMLDesc(0)):
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if disk.target not in _disk_targets(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if not flags:
            return False
        try:
            dom.attachDeviceFlags(xml, flags)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"attaching {disk.target} to domain {name}: {e}") from e
        log.info("disk attached", domain=name, target=disk.target, live=active)
        return True

    def detach_disk(self, name: str, target: str, *, timeout: float = 30) -> bool:
        """Detach a disk from the live guest and the definition.

        The live part needs the guest's cooperation (ACPI eject); DeviceBusy
        when it has not happened within `timeout`. Returns False when the
        disk was not attached.
        """
        dom = self._lookup(name)
        if dom is None:
            return False
        done = False
        config = _disk_element_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), target)
        if config is not None:
            dom.detachDeviceFlags(config, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            done = True
        live = _disk_element_xml(dom.XMLDesc(0), target) if dom.isActive() else None
        if live is not None:
            try:
                dom.detachDeviceFlags(live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                # A detach already under way answers with an error; keep waiting.
                if _code(e) not in (
                    libvirt.VIR_ERR_OPERATION_FAILED,
                    libvirt.VIR_ERR_INTERNAL_ERROR,
                ):
                    raise LibvirtFailure(f"detaching {target} from domain {name}: {e}") from e
            deadline = self._clock() + timeout
            while target in _disk_targets(dom.XMLDesc(0)) and dom.isActive():
                if self._clock() > deadline:
                    raise DeviceBusy(
                        f"domain {name} has not released disk {target} after {timeout:.0f}s"
                    )
                self._sleep(self.poll_interval)
            done = True
        if done:
            log.info("disk detached", domain=name, target=target)
        return done

    # --- secrets ----------------------------------------------------------------------

    def ensure_iscsi_secret(self, usage: str, password: str, description: str = "") -> str:
        """A private libvirt secret for CHAP, found by usage; returns its UUID."""
        conn = self.connection()
        try:
            secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
        except libvirt.libvirtError as e:
            if _code(e) != libvirt.VIR_ERR_NO_SECRET:
                raise LibvirtFailure(f"looking up secret {usage}: {e}") from e
            secret = conn.secretDefineXML(iscsi_secret_xml(usage, description))
            log.info("secret defined", usage=usage)
        secret.setValue(password.encode())
        uuid: str = secret.UUIDString()
        return uuid

    def iscsi_secret_usages(self) -> list[str]:
        """Usage names of every iSCSI secret libvirt holds."""
        secrets = self.connection().listAllSecrets(0)
        return [
            str(s.usageID())
            for s in secrets
            if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_ISCSI
        ]

    def delete_iscsi_secret(self, usage: str) -> None:
        try:
            secret = self.connection().secretLookupByUsage(
                libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage
            )
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_SECRET:
                return
            raise LibvirtFailure(f"looking up secret {usage}: {e}") from e
        secret.undefine()
        log.info("secret removed", usage=usage)

    def _check_owned(self, dom: Any, name: str) -> None:
        if _owner(dom) is None:
            raise DomainConflict(f"domain {name} is not managed by Nubes")


def _state_of(dom: Any) -> DomainState:
    state, _reason = dom.state()
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        return DomainState.SAVED if dom.hasManagedSaveImage(0) else DomainState.SHUTOFF
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return DomainState.PAUSED
    return DomainState.RUNNING


def _owner(dom: Any) -> Owner | None:
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except libvirt.libvirtError as e:
        if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    el = ET.fromstring(text)
    # libvirt hands the element back without a namespace on the children.
    values = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in el}
    if not values.get("uid"):
        return None
    return Owner(values["uid"], values.get("namespace", ""), values.get("name", ""))


def _observe(dom: Any) -> ObservedDomain:
    state = _state_of(dom)
    flags = 0 if dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE
    return ObservedDomain(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=state,
        owner=_owner(dom),
        disk_targets=tuple(_disk_targets(dom.XMLDesc(flags))),
    )


def _disk_targets(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [t.get("dev", "") for t in root.findall("./devices/disk/target") if t.get("dev")]


def _disk_element_xml(xml: str, target: str) -> str | None:
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return ET.tostring(disk, encoding="unicode")
    return None
