"""The compute node's sync verbs: every side effect of running a guest here.

Narrow and idempotent, each safe to repeat after a crash (KubeVirt's
virt-handler `Sync*` verbs are the model): `prepare` (directory, root disk,
CHAP secrets, config drive), `plug` (VIFs, isolated until bound), `sync`
(define the domain and drive it to a power state), `stop`, `teardown`, and
the disk verbs the one-shot actions use. They take a `GuestPlan` from the
pure planner (nubes.agent.compute_plan) and an injected runner, libvirt
connection, image cache and VIF plugger; nothing here reads the API.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from nubes.drivers.compute.configdrive import (
    ConfigDriveSpec,
    delete_config_drive,
    ensure_config_drive,
)
from nubes.drivers.compute.domain import DATA_TARGETS, DomainSpec, IscsiDisk
from nubes.drivers.compute.libvirt import DomainState, LibvirtCompute
from nubes.drivers.hostfiles import guest_file, make_guest_dir, private_file
from nubes.drivers.images.cache import ImageCache, ImageSource, SnapshotFile
from nubes.drivers.images.inspect import ImageInspectionError, inspect_image
from nubes.drivers.network.netns import one_socket_per_namespace
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.problem import fail
from nubes.drivers.runner import Runner

log = structlog.get_logger()

SHUTDOWN_TIMEOUT = 30.0
PORTS_RECORD = "ports.json"
BOOT_RECORD = "boot-config"


@dataclass(frozen=True)
class LocalDisk:
    path: str
    source: ImageSource | None
    """Where a missing disk comes from (image, shelved disk, transfer)."""
    size: int
    """Bytes it has at least (0: the source's own size)."""


@dataclass(frozen=True)
class VifPlug:
    port_uid: str
    mac: str
    mtu: int


@dataclass(frozen=True)
class IscsiSecret:
    usage: str
    password: str


@dataclass(frozen=True)
class GuestPlan:
    """Everything the node does for one guest (from the pure planner)."""

    directory: str
    domain: DomainSpec
    root: LocalDisk | None
    """The local root disk; None when the root is a volume."""
    vifs: tuple[VifPlug, ...]
    secrets: tuple[IscsiSecret, ...]
    secret_prefix: str
    """Usages of this guest's CHAP secrets on this node start and end with
    these (so stale ones can be found and removed)."""
    secret_suffix: str
    config_drive: ConfigDriveSpec | None
    boot_digest: str
    """What a running domain cannot change without a cold restart."""


class ComputeNode:
    def __init__(
        self,
        runner: Runner,
        libvirt: LibvirtCompute,
        cache: ImageCache,
        vifs: VifPlugger,
        root: Path,
        *,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        self.runner = runner
        self.libvirt = libvirt
        self.cache = cache
        self.vifs = vifs
        self.root = root
        self.shutdown_timeout = shutdown_timeout
        self._cache_users = 0
        self._cache_users_lock = threading.Lock()

    # --- disks ---------------------------------------------------------------------

    def prepare(self, plan: GuestPlan) -> None:
        """Directory, root disk, CHAP secrets, config drive, the record of
        the guest's ports (teardown unplugs them after a restart)."""
        directory = Path(plan.directory)
        # Root and QEMU's group only: the disks, the config drive (user data)
        # and the console log are the tenant's (see nubes.drivers.hostfiles).
        make_guest_dir(self.root)
        make_guest_dir(directory)
        if plan.root is not None:
            self.prepare_root(plan.root, plan.domain.name)
        for secret in plan.secrets:
            self.libvirt.ensure_iscsi_secret(secret.usage, secret.password)
        if plan.config_drive is not None and plan.domain.config_drive is not None:
            ensure_config_drive(self.runner, plan.config_drive, plan.domain.config_drive)
        (directory / PORTS_RECORD).write_text(json.dumps([v.port_uid for v in plan.vifs]))

    def prepare_root(self, disk: LocalDisk, domain: str) -> None:
        """The root disk exists and is at least its size (grown only while
        the guest is off)."""
        path = Path(disk.path)
        if path.exists():
            off = self.libvirt.state(domain) in (DomainState.SHUTOFF, DomainState.ABSENT)
            if disk.size and off and self.cache.disk_info(disk.path).virtual_size < disk.size:
                self.cache.grow_disk(disk.path, disk.size)
            return
        if disk.source is None:
            raise fail("ImageNotReady", "no imported image to create the root disk from")
        self.overlay_disk(disk.source, path, disk.size)

    def overlay_disk(self, source: ImageSource, disk: Path, size: int | None) -> None:
        """A qcow2 disk on the cached base of `source`, at least `size` bytes
        (None or 0: the image's own size). Pruning waits while one is made."""
        with self._cache_users_lock:
            self._cache_users += 1
        try:
            base = self.cache.ensure_image(source)
            want = max(size, base.virtual_size) if size else None
            self.cache.ensure_instance_disk(base, str(disk), want)
            guest_file(disk)  # libvirt lends it to QEMU's user while running
        finally:
            with self._cache_users_lock:
                self._cache_users -= 1

    def replace_disk(self, source: ImageSource, disk: Path, size: int | None) -> None:
        """Rebuild, rescue: a fresh disk from `source` in place of `disk`."""
        self.cache.delete_disk(str(disk))
        self.overlay_disk(source, disk, size)

    def delete_disk(self, disk: Path) -> None:
        self.cache.delete_disk(str(disk))

    def flatten(self, disk: Path, target: str, *, force_share: bool = False) -> SnapshotFile:
        """The disk as one qcow2 file in the image store (snapshot, shelve, move)."""
        snap = self.cache.snapshot_disk(str(disk), target, force_share=force_share)
        private_file(target)  # store files: the components' only
        return snap

    def prune_image_cache(self, grace: float) -> None:
        """Drop cached bases no local disk is backed by any more, once unused
        for `grace` seconds."""
        with self._cache_users_lock:
            if self._cache_users:
                return  # a disk is being made from a base: next time
            in_use = set()
            for disk in (*self.root.glob("*/disk"), *self.root.glob("*/rescue.qcow2")):
                try:
                    backing = inspect_image(str(disk)).backing_file
                except (ImageInspectionError, OSError):
                    continue  # being created or removed right now
                if backing:
                    in_use.add(os.path.basename(backing))
            self.cache.prune(in_use, min_unused_seconds=grace)

    # --- network -------------------------------------------------------------------

    @one_socket_per_namespace
    def plug(self, vifs: tuple[VifPlug, ...]) -> None:
        """The guest's VIFs, isolated (dead VLAN) until the node binds them."""
        for vif in vifs:
            self.vifs.plug_hybrid(vif.port_uid, vif.mac, vif.mtu)

    # --- the domain ----------------------------------------------------------------

    def state(self, name: str) -> DomainState:
        return self.libvirt.state(name)

    def stop(self, name: str) -> None:
        self.libvirt.shutdown(name, timeout=self.shutdown_timeout)

    def reboot(self, name: str, *, hard: bool) -> None:
        self.libvirt.reboot(name, hard=hard)

    def pause(self, name: str) -> None:
        self.libvirt.pause(name)

    def unpause(self, name: str) -> None:
        self.libvirt.unpause(name)

    def stage(self, plan: GuestPlan) -> DomainState:
        """Prepare, define, and start a shut-off guest paused: the slow part
        of a start (QEMU and libvirt setting up) overlaps the wiring of its
        ports, and `sync` lets its CPUs run once they are bound. Nothing runs
        in the guest meanwhile. Its VIFs are plugged first (`plug`), so that
        the node binds them while this runs."""
        self.prepare(plan)
        self.libvirt.ensure_defined(plan.domain)
        name = plan.domain.name
        if self.libvirt.state(name) == DomainState.SHUTOFF:
            (Path(plan.directory) / BOOT_RECORD).write_text(plan.boot_digest)
            self.libvirt.start(name, paused=True)
        return self.libvirt.state(name)

    def sync(self, plan: GuestPlan, want: str, may_start: Callable[[], bool]) -> DomainState:
        """Prepare, plug, define, and drive the domain towards `want`
        (Running, Paused, Stopped, Suspended). A running domain whose
        definition changed since it booted is restarted cold; a guest starts
        only when `may_start()` says so (its ports are bound)."""
        self.prepare(plan)
        self.plug(plan.vifs)
        spec = plan.domain
        name = spec.name
        self.libvirt.ensure_defined(spec)
        state = self.libvirt.state(name)
        boot = Path(plan.directory) / BOOT_RECORD
        if state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SAVED):
            if boot.exists() and boot.read_text() != plan.boot_digest:
                # Running with a definition that has changed since it booted
                # (resize, rescue...): only a cold restart applies it.
                self.stop(name)
                if plan.root is not None:
                    self.prepare_root(plan.root, name)  # off now: a bigger flavor grows it
                state = self.libvirt.state(name)
            else:
                self._sync_volumes(name, spec)
                self._prune_secrets(plan, keep=_secret_usages(spec))
        if want in ("Running", "Paused") and state in (DomainState.SHUTOFF, DomainState.SAVED):
            # Every start passes here (boot, restart for a new definition,
            # resume, a move's import): never on a port that is not bound.
            if not may_start():
                return state
            boot.write_text(plan.boot_digest)
            self.libvirt.start(name)  # restores a managed save
        if want == "Running" and state == DomainState.PAUSED:
            # A staged guest too: its CPUs run only on bound ports.
            if not may_start():
                return state
            self.libvirt.unpause(name)
        elif want == "Stopped" and state != DomainState.SHUTOFF:
            self.stop(name)
        elif want == "Paused":
            self.libvirt.pause(name)
        elif want == "Suspended" and state in (DomainState.RUNNING, DomainState.PAUSED):
            self.libvirt.suspend(name)
        return self.libvirt.state(name)

    def _sync_volumes(self, name: str, spec: DomainSpec) -> None:
        """Hot-plug and unplug data volumes of a running domain."""
        observed = set(self.libvirt.observe(name).disk_targets)
        wanted = {d.target: d for d in spec.data_disks}
        for target, disk in wanted.items():
            if target not in observed:
                self.libvirt.attach_disk(name, disk)
        # Only data-volume slots: root (vda), rescue (vdy), config drive (vdz) stay.
        for target in (observed & set(DATA_TARGETS)) - set(wanted):
            self.libvirt.detach_disk(name, target)

    def _prune_secrets(self, plan: GuestPlan, keep: set[str]) -> None:
        self.prune_secrets(plan.secret_prefix, plan.secret_suffix, keep)

    def prune_secrets(self, prefix: str, suffix: str, keep: set[str]) -> None:
        """Remove this node's CHAP secrets of a guest that no disk uses."""
        for usage in self.libvirt.iscsi_secret_usages():
            if usage.startswith(prefix) and usage.endswith(suffix) and usage not in keep:
                self.libvirt.delete_iscsi_secret(usage)

    @one_socket_per_namespace
    def teardown(self, name: str, directory: Path, secret_prefix: str, secret_suffix: str) -> None:
        """Remove everything of a guest from this node (domain, VIFs from the
        ports record, CHAP secrets, config drive, disks)."""
        self.libvirt.undefine(name)
        record = directory / PORTS_RECORD
        if record.exists():
            for port_uid in json.loads(record.read_text()):
                self.vifs.unplug(port_uid)
        self.prune_secrets(secret_prefix, secret_suffix, keep=set())
        delete_config_drive(str(directory / "config.iso"))
        shutil.rmtree(directory, ignore_errors=True)


def _secret_usages(spec: DomainSpec) -> set[str]:
    disks = (spec.root_disk, *spec.data_disks)
    return {d.chap.secret_usage for d in disks if isinstance(d, IscsiDisk) and d.chap}
