"""The node side of Nova: instances placed on this node become libvirt
domains, converged to their desired power state.

Per instance: the image is fetched once into the node's cache (raw base in
`_base`), the root disk is a qcow2 overlay on it, the config drive carries
metadata and user data, each port is plugged (hybrid: tap -> qbr -> qvb/qvo
-> br-int), attached volumes come from their iSCSI exports, and the domain
is defined from a DomainSpec and driven to Running, Stopped, Paused,
Suspended (managed save) or Shelved (root disk flattened into the image
store, domain and disk removed from the node). The agent writes only the
fields it observes: power state, domain, attached volumes, console log,
shelved disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from nubes.agent.actions import ActionRunner, is_move
from nubes.agent.binding import Unbound, unbound_ports
from nubes.agent.config import NODE_LABEL, AgentConfig
from nubes.agent.image_source import source_of
from nubes.agent.network import NodeNetworking
from nubes.agent.problems import node_problem
from nubes.api.compute import Flavor, Instance, InstanceAction
from nubes.api.image import Image
from nubes.api.lifecycle import effective, pending, placement
from nubes.api.network import Port
from nubes.api.storage import Volume
from nubes.drivers.compute.configdrive import (
    ConfigDriveSpec,
    NetworkDataPort,
    delete_config_drive,
    ensure_config_drive,
)
from nubes.drivers.compute.domain import (
    ChapAuth,
    DataDisk,
    DomainSpec,
    FileDisk,
    IscsiDisk,
    Nic,
    Owner,
)
from nubes.drivers.compute.libvirt import DomainState, LibvirtCompute
from nubes.drivers.host import VirtType, detect_virt_type
from nubes.drivers.hostfiles import guest_file, make_guest_dir, private_file
from nubes.drivers.images.cache import ImageCache, ImageSource
from nubes.drivers.images.inspect import ImageInspectionError, inspect_image
from nubes.drivers.images.store import internal_path, internal_ref
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.problem import Failure, Problem, fail, problem_of
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import CONFIGMAPS, SECRETS, ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

log = structlog.get_logger()

GIB = 2**30
POWER = {
    DomainState.RUNNING: "Running",
    DomainState.PAUSED: "Paused",
    DomainState.SHUTOFF: "Stopped",
    DomainState.SAVED: "Suspended",
}
CONSOLE_TAIL = 64 * 1024
SHUTDOWN_TIMEOUT = 30.0
IMAGE_CACHE_PRUNE_INTERVAL = 3600.0
DATA_TARGETS = [f"vd{c}" for c in "bcdefghijklmnopqrstuvwx"]  # vdy: rescue, vdz: config


@dataclass
class VolumeDisk:
    """A volume to attach: where it is exported, and its CHAP secret."""

    name: str
    target: str
    host: str
    port: int
    iqn: str
    lun: int
    username: str
    password: str


@dataclass
class Plan:
    """Everything the node needs to converge one instance (no API access)."""

    inst: Instance
    vcpus: int
    ram_mib: int
    disk_bytes: int
    root_source: ImageSource | None
    """Where a missing root disk comes from (image, shelved disk, transfer)."""
    ports: list[Port] = field(default_factory=list)
    volumes: list[VolumeDisk] = field(default_factory=list)
    boot_volume: VolumeDisk | None = None
    """Root disk on a volume (boot from volume) instead of a local overlay."""


class InstanceAgent(Reconciler[Instance]):
    """Converges this node's instances; GCs domains of instances that left."""

    kind = Instance
    workers = 4

    def __init__(self, config: AgentConfig, networking: NodeNetworking):
        self.config = config
        self.node = config.node
        self.own_finalizer = f"compute.nubes.io/agent-{config.node}"
        self.node_tag = hashlib.sha256(config.node.encode()).hexdigest()[:8]
        self.runner = SubprocessRunner()
        self.root = Path(config.state_dir) / "instances"
        self.cache = ImageCache(str(self.root), self.runner)
        self._cache_users = 0
        self._vif_wait: dict[str, float] = {}
        self._cache_users_lock = threading.Lock()
        self.libvirt = LibvirtCompute()
        self.vifs = VifPlugger(
            networking.links, networking.switch, config.node_netns, self.node_tag
        )
        self.networking = networking
        self.store_dir = Path(config.image_store)
        self.local: set[str] = set()
        """Uids of instances with something on this node."""
        self._seen: dict[str, Instance] = {}
        self.actions = ActionRunner(self)
        self._console_digest: dict[str, str] = {}
        self._failures: dict[str, int] = {}

    def setup(self, op: Operator) -> None:
        super().setup(op)
        instances = op.store(Instance)
        instances.add_index("uid", lambda i: [i.uid])
        ports = op.store(Port)
        ports.add_index("device", lambda p: [p.spec.device_id] if p.spec.device_id else [])
        op.store(Image)
        op.store(Flavor)
        op.store(InstanceAction).add_index(
            "instance", lambda a: [f"{a.namespace}/{a.spec.instance}"]
        )
        op.store(Volume)
        op.watch(
            Port,
            Instance,
            lambda p: (
                [i.key for i in instances.by_index("uid", p.spec.device_id)]
                if p.spec.device_id
                else []
            ),
            when=_port_facts_changed,
        )
        op.watch(
            Volume,
            Instance,
            lambda v: (
                [v.status.attachment.instance and f"{v.namespace}/{v.status.attachment.instance}"]
                if v.status.attachment
                else []
            ),
            when=_export_changed,
        )
        op.watch(
            Image, Instance, lambda img: [i.key for i in instances if i.status.image == img.key]
        )
        # New or advancing actions (and moves towards this node) wake the instance.
        op.watch(InstanceAction, Instance, lambda a: [f"{a.namespace}/{a.spec.instance}"])
        op.on_start(self._adopt)
        op.every(5.0, self.publish_consoles)
        op.every(IMAGE_CACHE_PRUNE_INTERVAL, self.prune_image_cache)

    async def _adopt(self) -> None:
        """Domains of this node from before a restart: converge or collect them."""
        owned = await asyncio.to_thread(self.libvirt.list_owned)
        self.local = {
            d.owner.uid for d in owned if d.owner is not None and d.name.endswith(self.node_tag)
        }
        if self.root.exists():
            self.local |= {
                p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("_")
            }

    def accepts(self, obj: Instance) -> bool:
        return self._placed_here(obj) or obj.uid in self.local or self._moving_here(obj)

    def _placed_here(self, obj: Instance) -> bool:
        # A move that just completed counts before the controller records it:
        # the target keeps what it built, the source lets go.
        actions = self.op.store(InstanceAction).by_index("instance", obj.key)
        return placement(obj, effective(obj, actions))[0] == self.node

    def _next_action(self, obj: Instance) -> InstanceAction | None:
        return pending(self.op.store(InstanceAction).by_index("instance", obj.key))

    def _moving_here(self, obj: Instance) -> bool:
        action = self._next_action(obj)
        return action is not None and is_move(action) and action.status.target_node == self.node

    def domain_name(self, inst: Instance) -> str:
        """Per node, so that simulated nodes sharing one libvirtd (tests) never
        touch each other's domains; a real node has its own libvirtd anyway."""
        return f"nubes-{inst.uid}-{self.node_tag}"

    def domain_uuid(self, inst: Instance) -> str:
        return str(uuid.uuid5(uuid.UUID(inst.uid), self.node))

    def instance_dir(self, inst: Instance) -> Path:
        return self.root / inst.uid

    # --- converge -------------------------------------------------------------------

    async def converge(self, obj: Instance) -> Outcome:
        self._seen[obj.key] = obj
        action = self._next_action(obj)
        if self._moving_here(obj):
            # Target of a move: build the instance here from the transferred disk.
            assert action is not None
            await self.actions.step(obj, action, await self._plan(obj, flavor=action.status.flavor))
            return Outcome.observed({})
        if not self._placed_here(obj):
            # Moved away, shelved or never ours: collect what is left here.
            if obj.uid in self.local:
                await asyncio.to_thread(self._teardown, obj)
                await self._drop_console(obj)
                await self._drop_finalizer(obj)
            return Outcome.observed({})
        if obj.status.node != self.node:
            # A move here completed and the controller has not recorded it
            # yet. Only the node in status.node may write the instance
            # (nubes-agent-node policy), and the guest starts only once the
            # move is recorded anyway: the record's watch event brings it back.
            return Outcome.observed({}, requeue_after=2)
        await self._add_finalizer(obj)
        self.local.add(obj.uid)
        try:
            return await self._converge_here(obj, action)
        except (Failure, OSError) as e:
            # One tenant's broken instance is reported on it (the controller
            # shows the reason in its conditions); the node keeps going.
            return await self._failed(obj, problem_of(e, f"instance {obj.name}"))

    async def _failed(self, obj: Instance, problem: Problem) -> Outcome:
        failures = self._failures.get(obj.uid, 0) + 1
        self._failures[obj.uid] = failures
        delay = min(60.0, 2.0 * 2 ** min(failures, 4))
        log.warning(
            "instance not converged",
            instance=obj.key,
            reason=problem.reason,
            error=problem.message,
            retry_in=delay,
        )
        state = await asyncio.to_thread(self.libvirt.state, self.domain_name(obj))
        status = {
            "nodeProblem": node_problem(problem, self.node),
            "powerState": POWER.get(state, "Absent"),
        }
        return Outcome.observed(status, requeue_after=delay)

    async def _converge_here(self, obj: Instance, action: InstanceAction | None) -> Outcome:
        plan = await self._plan(obj)
        if plan is None:
            return Outcome.observed({}, requeue_after=5)
        if action is not None and await self.actions.step(obj, action, plan):
            state = await asyncio.to_thread(self.libvirt.state, self.domain_name(obj))
            return Outcome.observed({"powerState": POWER.get(state, "Absent")}, requeue_after=2)
        if obj.spec.power_state == "Shelved":
            shelved = await asyncio.to_thread(self._shelve, plan)
            return Outcome.observed(
                {"shelvedDisk": shelved, "powerState": "Shelved", "nodeProblem": None}
            )
        waiting = await self._ports_gate(plan)
        if waiting is not None:
            return waiting
        state = await asyncio.to_thread(self.converge_domain, plan)
        self._failures.pop(obj.uid, None)
        status: dict[str, Any] = {
            "nodeProblem": None,
            "powerState": POWER.get(state, "Absent"),
            "domain": self.domain_name(obj),
            "attachedVolumes": [v.name for v in plan.volumes]
            + ([plan.boot_volume.name] if plan.boot_volume else []),
            "consoleLog": f"{obj.name}-console",
        }
        if obj.status.shelved_disk and state == DomainState.RUNNING:
            # Unshelved: the disk is local again, the store copy can go.
            await asyncio.to_thread(self._drop_shelved, obj.status.shelved_disk.ref)
            status["shelvedDisk"] = None
        settled = status["powerState"] == obj.spec.power_state
        return Outcome.observed(status, requeue_after=None if settled else 2)

    async def _ports_gate(self, plan: Plan) -> Outcome | None:
        """None when the guest may start (or runs already). Like Nova waiting
        for network-vif-plugged: the VIFs are plugged (isolated), and the guest
        starts once every port is bound on this node and carries its network,
        and is Ready (in the DHCP server), because a guest started earlier asks
        for an address nobody gives. Past the binding timeout a bound port that
        is not Ready yet no longer holds the boot; an unbound one always does,
        reported as PortBindingTimeout until it is bound."""
        inst = plan.inst
        if inst.spec.power_state not in ("Running", "Paused") or not plan.ports:
            self._vif_wait.pop(inst.uid, None)
            return None
        state = await asyncio.to_thread(self.libvirt.state, self.domain_name(inst))
        if state not in (DomainState.ABSENT, DomainState.SHUTOFF, DomainState.SAVED):
            return None  # running: converge_domain checks again before any restart
        await asyncio.to_thread(self._plug, plan)
        unbound = await asyncio.to_thread(self.unbound_ports, plan)
        ports = self.op.store(Port)
        ready = all(
            p is not None and p.status.is_true("Ready")
            for p in (ports.lookup(q.name, q.namespace) for q in plan.ports)
        )
        since = self._vif_wait.setdefault(inst.uid, time.monotonic())
        timeout = self.config.port_binding_timeout
        late = time.monotonic() - since >= timeout
        if not unbound and (ready or late):
            if not ready:
                log.warning("ports bound but not ready, booting", instance=inst.key)
            self._vif_wait.pop(inst.uid, None)
            return None
        if unbound:
            self.networking.kick()  # bind what was just plugged without waiting for a resync
        if not late:
            return Outcome.observed({}, requeue_after=1)
        problem = Problem(
            "PortBindingTimeout",
            f"not started after {timeout:g} s: "
            + "; ".join(map(str, unbound))
            + f". It starts once its ports are bound on {self.node}",
        )
        error = node_problem(problem, self.node)
        if inst.status.node_problem is None or inst.status.node_problem.wire() != error:
            log.warning("ports not bound, not booting", instance=inst.key, why=problem.message)
        return Outcome.observed(
            {"nodeProblem": error, "powerState": POWER.get(state, "Absent")}, requeue_after=5
        )

    def unbound_ports(self, plan: Plan) -> list[Unbound]:
        """The plan's ports a guest may not run on now (blocking: reads OVS)."""
        ports = self.op.store(Port)
        fresh = [(p.name, ports.lookup(p.name, p.namespace)) for p in plan.ports]
        return unbound_ports(fresh, self.node, self.vifs.switch.vif_ports())

    def _plug(self, plan: Plan) -> list[Nic]:
        nics = []
        for port in plan.ports:
            names = self.vifs.plug_hybrid(
                port.uid, port.status.mac_address or "", port.status.mtu or 1500
            )
            nics.append(
                Nic(
                    bridge=names.qbr,
                    tap=names.tap,
                    mac=port.status.mac_address or "",
                    mtu=port.status.mtu or 1500,
                )
            )
        return nics

    async def forget(self, key: str) -> None:
        """The Instance is gone from the API (its finalizer was not ours, or
        it was deleted mid-move): remove whatever this node still has."""
        last = self._seen.pop(key, None)
        if last is not None and last.uid in self.local:
            await asyncio.to_thread(self._teardown, last)
            self.local.discard(last.uid)

    async def finalize(self, obj: Instance) -> Outcome | None:
        if self.own_finalizer in obj.metadata.finalizers:
            await asyncio.to_thread(self._teardown, obj)
            await self._drop_finalizer(obj)
        return None

    async def _drop_console(self, obj: Instance) -> None:
        """The console ConfigMap carries this node's label, which only this
        agent may change: a node the instance moved to makes its own."""
        self._console_digest.pop(obj.uid, None)
        try:
            await self.op.kube.delete_raw(CONFIGMAPS, f"{obj.name}-console", obj.namespace)
        except ApiError as e:
            if e.status != 403:  # another node's map: admission keeps it
                raise

    async def _add_finalizer(self, obj: Instance) -> None:
        if self.own_finalizer not in obj.metadata.finalizers:
            await self.op.kube.set_finalizers(obj, [*obj.metadata.finalizers, self.own_finalizer])

    async def _drop_finalizer(self, obj: Instance) -> None:
        self.local.discard(obj.uid)
        if self.own_finalizer in obj.metadata.finalizers:
            fresh = await self.op.kube.get(Instance, obj.name, obj.namespace)
            if fresh is not None:
                await self.op.kube.set_finalizers(
                    fresh, [f for f in fresh.metadata.finalizers if f != self.own_finalizer]
                )

    # --- planning (async: reads the caches and Secrets) ------------------------------

    async def _plan(self, inst: Instance, *, flavor: str | None = None) -> Plan | None:
        # The same derivation as the controller's, so a just-finished Resize
        # or Rebuild takes effect here without waiting for its status write.
        actions = self.op.store(InstanceAction).by_index("instance", inst.key)
        eff = effective(inst, actions)
        found: Flavor | None = self.op.store(Flavor).lookup(flavor or eff.flavor)
        if found is None:
            return None
        image: Image | None = None
        if eff.image is not None:
            image = self.op.store(Image).lookup(
                eff.image.name, eff.image.namespace or inst.namespace
            )
        root: ImageSource | None = None
        shelved = inst.status.shelved_disk
        if shelved is not None and not shelved.ref.startswith("volume:"):
            path = internal_path(str(self.store_dir), shelved.ref)
            root = ImageSource(path, shelved.sha256, "qcow2")
        elif image is not None:
            root = source_of(image, self.store_dir)
        disk_gib = found.spec.disk_gib
        if not disk_gib and image is not None:
            disk_gib = max(1, -(-(image.status.virtual_size_bytes or 0) // GIB))
        ports = [
            p
            for p in self.op.store(Port).by_index("device", inst.uid)
            if p.namespace == inst.namespace and p.status.mac_address
        ]
        if len(ports) < len(inst.spec.networks):
            return None  # boot with every NIC: there is no NIC hot-plug
        order = {a.port: i for i, a in enumerate(inst.status.addresses)}
        ports.sort(key=lambda p: order.get(p.name, len(order)))
        boot_volume = None
        if inst.spec.boot_volume is not None:
            boot_volume = await self._volume_disk(inst, inst.spec.boot_volume.name, "vda")
            if boot_volume is None:
                return None  # not exported for us yet
        return Plan(
            inst=inst,
            boot_volume=boot_volume,
            vcpus=found.spec.vcpus,
            ram_mib=found.spec.ram_mib,
            disk_bytes=disk_gib * GIB,
            root_source=root,
            ports=ports,
            volumes=await self._volume_disks(inst),
        )

    async def _volume_disks(self, inst: Instance) -> list[VolumeDisk]:
        disks = []
        for index, attachment in enumerate(inst.spec.volumes[: len(DATA_TARGETS)]):
            disk = await self._volume_disk(inst, attachment.volume, DATA_TARGETS[index])
            if disk is not None:
                disks.append(disk)
        return disks

    async def _volume_disk(self, inst: Instance, name: str, target: str) -> VolumeDisk | None:
        """The volume's iSCSI export, if it is attached to this instance and
        exported for this node; CHAP credentials from the Volume's Secret."""
        volume: Volume | None = self.op.store(Volume).lookup(name, inst.namespace)
        if volume is None or volume.status.export is None or volume.status.attachment is None:
            return None
        export = volume.status.export
        if volume.status.attachment.instance_uid != inst.uid:
            return None
        if export.initiator_node not in (None, self.node):
            return None  # still exported for the node the instance left
        # In the components' namespace: tenants never read CHAP credentials.
        secret = await self.op.kube.get_raw(
            SECRETS, export.chap_secret, self.config.secret_namespace
        )
        if secret is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        host, _, port = export.portal.rpartition(":")
        return VolumeDisk(
            volume.name,
            target,
            host,
            int(port or 3260),
            export.iqn,
            export.lun,
            data.get("username", ""),
            data.get("password", ""),
        )

    # --- node work (blocking, in a worker thread) -------------------------------------

    def rescue_disk(self, inst: Instance) -> Path:
        return self.instance_dir(inst) / "rescue.qcow2"

    def _root_disk(self, plan: Plan) -> str:
        disk = self.instance_dir(plan.inst) / "disk"
        if disk.exists():
            if plan.disk_bytes and self.libvirt.state(self.domain_name(plan.inst)) in (
                DomainState.SHUTOFF,
                DomainState.ABSENT,
            ):
                info = self.cache.disk_info(str(disk))
                if info.virtual_size < plan.disk_bytes:
                    self.cache.grow_disk(str(disk), plan.disk_bytes)
            return str(disk)
        if plan.root_source is None:
            raise fail("ImageNotReady", "no imported image to create the root disk from")
        self.overlay_disk(plan.root_source, disk, plan.disk_bytes)
        return str(disk)

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

    def _config_drive(self, plan: Plan) -> str:
        inst = plan.inst
        path = self.instance_dir(inst) / "config.iso"
        ports = tuple(
            NetworkDataPort(
                port_id=p.uid,
                mac=p.status.mac_address or "",
                mtu=p.status.mtu or 1500,
                network_id=p.status.network_uid or "",
            )
            for p in plan.ports
        )
        spec = ConfigDriveSpec(
            uuid=inst.uid,
            name=inst.name,
            hostname=inst.spec.hostname or inst.name,
            metadata=dict(inst.spec.metadata),
            user_data=inst.spec.user_data.encode() if inst.spec.user_data else None,
            ports=ports,
            availability_zone=inst.spec.availability_zone,
            project=inst.namespace,
        )
        ensure_config_drive(self.runner, spec, str(path))
        return str(path)

    def _domain_spec(self, plan: Plan) -> DomainSpec:
        inst = plan.inst
        directory = self.instance_dir(inst)
        # Root and QEMU's group only: the disks, the config drive (user data)
        # and the console log are the tenant's (see nubes.drivers.hostfiles).
        make_guest_dir(self.root)
        make_guest_dir(directory)
        root: DataDisk = (
            self._iscsi_disk(inst, plan.boot_volume)
            if plan.boot_volume
            else FileDisk(self._root_disk(plan), "vda")
        )
        nics = self._plug(plan)
        (directory / "ports.json").write_text(json.dumps([p.uid for p in plan.ports]))
        data: list[DataDisk] = []
        for vol in plan.volumes:
            data.append(self._iscsi_disk(inst, vol))
        return DomainSpec(
            name=self.domain_name(inst),
            uuid=self.domain_uuid(inst),
            owner=Owner(inst.uid, inst.namespace or "", inst.name),
            vcpus=plan.vcpus,
            memory_mib=plan.ram_mib,
            virt_type=self._virt_type(),
            root_disk=root,
            console_log=str(directory / "console.log"),
            config_drive=self._config_drive(plan) if inst.spec.config_drive else None,
            data_disks=tuple(data),
            nics=tuple(nics),
            # The rescue disk's presence is the node's record of rescue mode.
            rescue_disk=FileDisk(str(self.rescue_disk(inst)), "vdy")
            if self.rescue_disk(inst).exists()
            else None,
        )

    def _iscsi_disk(self, inst: Instance, vol: VolumeDisk) -> IscsiDisk:
        """An exported volume as a disk QEMU's own initiator opens, its CHAP
        password in a libvirt secret."""
        usage = f"{self._secret_prefix(inst)}{vol.name}-{self.node_tag}"
        self.libvirt.ensure_iscsi_secret(usage, vol.password)
        return IscsiDisk(
            host=vol.host,
            port=vol.port,
            iqn=vol.iqn,
            lun=vol.lun,
            target=vol.target,
            chap=ChapAuth(vol.username, usage),
        )

    @staticmethod
    def _secret_prefix(inst: Instance) -> str:
        return f"nubes-volume-{inst.uid}-"

    def _prune_secrets(self, inst: Instance, keep: set[str]) -> None:
        """Remove this node's CHAP secrets of the instance that no disk uses."""
        prefix, suffix = self._secret_prefix(inst), f"-{self.node_tag}"
        for usage in self.libvirt.iscsi_secret_usages():
            if usage.startswith(prefix) and usage.endswith(suffix) and usage not in keep:
                self.libvirt.delete_iscsi_secret(usage)

    def _virt_type(self) -> VirtType:
        if self.config.virt_type == "kvm":
            return "kvm"
        if self.config.virt_type == "qemu":
            return "qemu"
        return detect_virt_type(self.runner, self.config.state_dir)

    def converge_domain(self, plan: Plan) -> DomainState:
        spec = self._domain_spec(plan)
        name = spec.name
        self.libvirt.ensure_defined(spec)
        state = self.libvirt.state(name)
        boot = self.instance_dir(plan.inst) / "boot-config"
        wanted_boot = _boot_digest(spec, plan.disk_bytes)
        if state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SAVED):
            if boot.exists() and boot.read_text() != wanted_boot:
                # Running with a definition that has changed since it booted
                # (resize, rescue...): only a cold restart applies it.
                self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
                if plan.boot_volume is None:
                    self._root_disk(plan)  # off now: a bigger flavor grows the disk
                state = self.libvirt.state(name)
            else:
                self._sync_volumes(name, spec)
                self._prune_secrets(plan.inst, _secret_usages(spec))
        want = plan.inst.spec.power_state
        if want in ("Running", "Paused") and state in (DomainState.SHUTOFF, DomainState.SAVED):
            # Every start passes here (boot, restart for a new definition,
            # resume, a move's import): never on a port that is not bound.
            unbound = self.unbound_ports(plan)
            if unbound:
                log.info(
                    "not starting: ports not bound",
                    instance=plan.inst.key,
                    why=[str(u) for u in unbound],
                )
                return state
            boot.write_text(wanted_boot)
            self.libvirt.start(name)  # restores a managed save
        if want == "Running" and state == DomainState.PAUSED:
            self.libvirt.unpause(name)
        elif want == "Stopped" and state != DomainState.SHUTOFF:
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
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

    def _shelve(self, plan: Plan) -> dict[str, str] | None:
        """Flatten the root disk into the image store; the controller then
        frees the node and this agent collects the rest."""
        inst = plan.inst
        if inst.status.shelved_disk:
            return inst.status.shelved_disk.wire()
        name = self.domain_name(inst)
        if plan.boot_volume is not None:
            # The root disk is the volume: stopping is all it takes to offload.
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
            return {"ref": f"volume:{plan.boot_volume.name}", "sha256": ""}
        disk = self.instance_dir(inst) / "disk"
        if not disk.exists():
            return None
        self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
        ref = internal_ref("shelved", inst.uid)
        target = internal_path(str(self.store_dir), ref)
        snap = self.cache.snapshot_disk(str(disk), target)
        private_file(target)  # store files: the components' only
        return {"ref": ref, "sha256": snap.sha256}

    def _drop_shelved(self, ref: str) -> None:
        if not ref.startswith("volume:"):
            Path(internal_path(str(self.store_dir), ref)).unlink(missing_ok=True)

    def _teardown(self, inst: Instance) -> None:
        """Remove everything of the instance from this node."""
        name = self.domain_name(inst)
        self.libvirt.undefine(name)
        directory = self.instance_dir(inst)
        ports_file = directory / "ports.json"
        if ports_file.exists():
            for port_uid in json.loads(ports_file.read_text()):
                self.vifs.unplug(port_uid)
        self._prune_secrets(inst, keep=set())
        delete_config_drive(str(directory / "config.iso"))
        shutil.rmtree(directory, ignore_errors=True)
        self._console_digest.pop(inst.uid, None)
        self._failures.pop(inst.uid, None)
        log.info("instance removed from node", instance=inst.key, node=self.node)
        self._prune_image_cache()

    async def prune_image_cache(self) -> None:
        await asyncio.to_thread(self._prune_image_cache)

    def _prune_image_cache(self) -> None:
        """Drop cached bases that no local disk is backed by any more, once
        unused for the grace period."""
        with self._cache_users_lock:
            if self._cache_users:
                return  # a disk is being made from a base: next time
            self._prune_unused_bases()

    def _prune_unused_bases(self) -> None:
        in_use = set()
        for disk in (*self.root.glob("*/disk"), *self.root.glob("*/rescue.qcow2")):
            try:
                backing = inspect_image(str(disk)).backing_file
            except (ImageInspectionError, OSError):
                continue  # being created or removed right now
            if backing:
                in_use.add(os.path.basename(backing))
        self.cache.prune(in_use, min_unused_seconds=self.config.image_cache_grace)

    # --- console ---------------------------------------------------------------------

    async def publish_consoles(self) -> None:
        """The tail of each local serial console, in a ConfigMap users can read."""
        for inst in list(self.op.store(Instance)):
            if inst.deleting or not self._placed_here(inst):
                continue
            path = self.instance_dir(inst) / "console.log"
            tail = await asyncio.to_thread(_tail, path, CONSOLE_TAIL)
            if tail is None:
                continue
            digest = hashlib.sha256(tail.encode()).hexdigest()
            if self._console_digest.get(inst.uid) == digest:
                continue
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"{inst.name}-console",
                    "namespace": inst.namespace,
                    # The node label: only this node's agent may change it.
                    "labels": {"nubes.io/instance": inst.name, NODE_LABEL: self.node},
                    "ownerReferences": [
                        {
                            "apiVersion": Instance.crd.api_version,
                            "kind": "Instance",
                            "name": inst.name,
                            "uid": inst.uid,
                        }
                    ],
                },
                "data": {"console.log": tail},
            }
            try:
                await self.op.kube.apply_raw(CONFIGMAPS, body)
                self._console_digest[inst.uid] = digest
            except ApiError as e:
                log.warning("console publish failed", instance=inst.key, error=str(e))


def _identity(disk: DataDisk) -> str:
    if isinstance(disk, IscsiDisk):
        return f"{disk.iqn}/{disk.lun}"
    return disk.path if isinstance(disk, FileDisk) else disk.device


def _boot_digest(spec: DomainSpec, disk_bytes: int) -> str:
    """What a running domain cannot change without a restart."""
    parts = [
        spec.vcpus,
        spec.memory_mib,
        _identity(spec.root_disk),
        disk_bytes,
        spec.rescue_disk.path if spec.rescue_disk else None,
        [(n.mac, n.bridge) for n in spec.nics],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _tail(path: Path, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _port_facts_changed(old: Port | None, new: Port | None) -> bool:
    def facts(p: Port | None) -> tuple[Any, ...] | None:
        if p is None:
            return None
        return (p.status.mac_address, p.status.mtu, p.status.host, p.status.is_true("Ready"))

    return facts(old) != facts(new)


def _export_changed(old: Volume | None, new: Volume | None) -> bool:
    def facts(v: Volume | None) -> tuple[Any, ...] | None:
        if v is None:
            return None
        return (
            v.status.attachment.wire() if v.status.attachment else None,
            v.status.export.wire() if v.status.export else None,
        )

    return facts(old) != facts(new)


def _secret_usages(spec: DomainSpec) -> set[str]:
    disks = (spec.root_disk, *spec.data_disks)
    return {d.chap.secret_usage for d in disks if isinstance(d, IscsiDisk) and d.chap}
