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
shelved disk, node problem.

The layers: the controller's status.intent (what to run) and this node's
facts go through the pure planner (nubes.agent.compute_plan) to a GuestPlan,
which the node driver's sync verbs (nubes.drivers.compute.node) carry out.
About 500 lines, one reconciler: placement, the ports gate, problems,
finalizers, strays left by moves while the agent was down; reading intents
(compute_intent), planning (compute_plan), consoles (console) and node work
(drivers.compute.node) live elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import structlog

from nubes.agent.actions import ActionRunner, is_move
from nubes.agent.binding import Unbound, unbound_ports
from nubes.agent.compute_intent import IntentReader
from nubes.agent.compute_plan import (
    DOMAIN_PREFIX,
    SECRET_PREFIX,
    NodeFacts,
    Plan,
    domain_name,
    plan_guest,
    vif_plugs,
)
from nubes.agent.config import AgentConfig
from nubes.agent.console import Consoles
from nubes.agent.network import NodeNetworking
from nubes.agent.problems import node_problem
from nubes.api.compute import (
    ActionResources,
    DiskTransfer,
    Instance,
    InstanceAction,
    InstanceStatus,
    StoreSource,
)
from nubes.api.lifecycle import last_move, pending, placement
from nubes.api.network import Port
from nubes.api.storage import Volume
from nubes.drivers.compute.libvirt import DomainState, LibvirtCompute
from nubes.drivers.compute.node import ComputeNode
from nubes.drivers.host import VirtType, detect_virt_type
from nubes.drivers.images.cache import ImageCache, ImageSource
from nubes.drivers.images.store import internal_path, internal_ref
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.problem import Failure, Problem, problem_of
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

log = structlog.get_logger()

POWER = {
    DomainState.RUNNING: "Running",
    DomainState.PAUSED: "Paused",
    DomainState.SHUTOFF: "Stopped",
    DomainState.SAVED: "Suspended",
}
IMAGE_CACHE_PRUNE_INTERVAL = 3600.0
FINALIZER_ATTEMPTS = 5


class InstanceAgent(Reconciler[Instance]):
    """Converges this node's instances; GCs domains of instances that left.

    What an instance is (resources, root source, NICs, volumes) comes from
    its status.intent, resolved by the controller; the agent adds its node's
    facts (ports bound here, volume exports, its cache and libvirt)."""

    kind = Instance
    workers = 4

    def __init__(self, config: AgentConfig, networking: NodeNetworking):
        self.config = config
        self.node = config.node
        self.own_finalizer = f"compute.nubes.io/agent-{config.node}"
        self.node_tag = hashlib.sha256(config.node.encode()).hexdigest()[:8]
        self.runner = SubprocessRunner()
        self.root = Path(config.state_dir) / "instances"
        self._vif_wait: dict[str, float] = {}
        self.libvirt = LibvirtCompute()
        self.vifs = VifPlugger(
            networking.links, networking.switch, config.node_netns, self.node_tag
        )
        self.compute = ComputeNode(
            self.runner, self.libvirt, ImageCache(str(self.root), self.runner), self.vifs, self.root
        )
        self.networking = networking
        self.store_dir = Path(config.image_store)
        self.local: set[str] = set()
        """Uids of instances with something on this node."""
        self._seen: dict[str, Instance] = {}
        self.actions = ActionRunner(self)
        self.intents = IntentReader(config, self.store_dir)
        self.consoles = Consoles(
            self.node, lambda i: self.instance_dir(i) / "console.log", self._placed_here
        )
        self._failures: dict[str, int] = {}

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self.intents.op = op
        instances = op.store(Instance)
        instances.add_index("uid", lambda i: [i.uid])
        ports = op.store(Port)
        ports.add_index("device", lambda p: [p.spec.device_id] if p.spec.device_id else [])
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
        # New or advancing actions (and moves towards this node) wake the instance.
        op.watch(InstanceAction, Instance, lambda a: [f"{a.namespace}/{a.spec.instance}"])
        op.on_start(self._adopt)
        self.consoles.register(op)
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
        await self._collect_strays()

    async def _collect_strays(self) -> None:
        """Instances this node still holds that its cache does not show: moved
        away or deleted while the agent was down. The cache holds only this
        node's instances, so one listing finds where the rest went (to drop
        this node's finalizer); what no listing shows is removed by uid."""
        cached = {i.uid for i in self.op.store(Instance)}
        strays = self.local - cached
        if not strays:
            return
        for raw in await self.op.kube.list_raw(path_of(Instance)):
            if raw.get("metadata", {}).get("uid") in strays:
                inst = Instance.model_validate(raw)
                self._seen[inst.key] = inst
                await self.forget(inst.key)
                strays.discard(inst.uid)
        for uid in strays:
            await asyncio.to_thread(self._remove_local, uid)
            self.local.discard(uid)

    def accepts(self, obj: Instance) -> bool:
        return self._holds(obj) or self._placed_here(obj) or self._moving_here(obj)

    def _holds(self, obj: Instance) -> bool:
        """Whether this node has something of the instance to let go of."""
        return obj.uid in self.local or self.own_finalizer in obj.metadata.finalizers

    def _placed_here(self, obj: Instance) -> bool:
        # A move that just completed counts before the controller records it:
        # the target keeps what it built, the source lets go.
        actions = self.op.store(InstanceAction).by_index("instance", obj.key)
        return placement(obj, last_move(actions))[0] == self.node

    def _next_action(self, obj: Instance) -> InstanceAction | None:
        return pending(self.op.store(InstanceAction).by_index("instance", obj.key))

    def _moving_here(self, obj: Instance) -> bool:
        action = self._next_action(obj)
        return action is not None and is_move(action) and action.status.target_node == self.node

    def domain_name(self, inst: Instance) -> str:
        return domain_name(inst, self.node_tag)

    def instance_dir(self, inst: Instance) -> Path:
        return self.root / inst.uid

    def facts(self, inst: Instance) -> NodeFacts:
        """What this node knows of itself for the planner (blocking: looks at files)."""
        return NodeFacts(
            node=self.node,
            node_tag=self.node_tag,
            instances_dir=str(self.root),
            virt_type=self._virt_type(),
            rescue_disk_present=self.rescue_disk(inst).exists(),
        )

    # --- converge -------------------------------------------------------------------

    async def converge(self, obj: Instance) -> Outcome:
        self._seen[obj.key] = obj
        action = self._next_action(obj)
        if self._moving_here(obj):
            # Target of a move: build the instance here from the transferred disk.
            assert action is not None
            resources = action.status.resources if action.spec.action == "Resize" else None
            await self.actions.step(obj, action, await self._plan(obj, resources=resources))
            return Outcome.observed({})
        if not self._placed_here(obj):
            # Moved away, shelved or never ours: collect what is left here.
            if self._holds(obj):
                await asyncio.to_thread(self._teardown, obj)
                await self.consoles.drop(obj)
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
        state = await asyncio.to_thread(self.compute.state, self.domain_name(obj))
        status = InstanceStatus(
            node_problem=node_problem(problem, self.node), power_state=POWER.get(state, "Absent")
        )
        return Outcome.observed(status.patch(), requeue_after=delay)

    async def _converge_here(self, obj: Instance, action: InstanceAction | None) -> Outcome:
        plan = await self._plan(obj)
        if plan is None:
            return Outcome.observed({}, requeue_after=5)
        if action is not None and await self.actions.step(obj, action, plan):
            state = await asyncio.to_thread(self.compute.state, self.domain_name(obj))
            status = InstanceStatus(power_state=POWER.get(state, "Absent"))
            return Outcome.observed(status.patch(), requeue_after=2)
        if obj.spec.power_state == "Shelved":
            shelved = await asyncio.to_thread(self._shelve, plan)
            status = InstanceStatus(shelved_disk=shelved, power_state="Shelved", node_problem=None)
            return Outcome.observed(status.patch())
        waiting = await self._ports_gate(plan)
        if waiting is not None:
            return waiting
        state = await asyncio.to_thread(self.converge_domain, plan)
        self._failures.pop(obj.uid, None)
        status = InstanceStatus(
            node_problem=None,
            power_state=POWER.get(state, "Absent"),
            domain=self.domain_name(obj),
            attached_volumes=[v.name for v in plan.volumes]
            + ([plan.boot_volume.name] if plan.boot_volume else []),
            console_log=f"{obj.name}-console",
        )
        if obj.status.shelved_disk and state == DomainState.RUNNING:
            # Unshelved: the disk is local again, the store copy can go.
            await asyncio.to_thread(self._drop_shelved, obj.status.shelved_disk.ref)
            status.shelved_disk = None
        settled = status.power_state == obj.spec.power_state
        return Outcome.observed(status.patch(), requeue_after=None if settled else 2)

    async def _ports_gate(self, plan: Plan) -> Outcome | None:
        """None when the guest may start (or runs already). Like Nova waiting
        for network-vif-plugged: the VIFs are plugged (isolated), and the guest
        starts once every port is bound on this node and carries its network,
        and is Ready (in the DHCP server), because a guest started earlier asks
        for an address nobody gives. Past the binding timeout a bound port that
        is not Ready yet no longer holds the boot; an unbound one always does,
        reported as PortBindingTimeout until it is bound."""
        inst = plan.inst
        if inst.spec.power_state not in ("Running", "Paused") or not plan.nics:
            self._vif_wait.pop(inst.uid, None)
            return None
        state = await asyncio.to_thread(self.compute.state, self.domain_name(inst))
        # A paused guest that should run is staged (see _stage), or about to
        # be resumed: both wait for the same ports.
        staged = state == DomainState.PAUSED and inst.spec.power_state == "Running"
        if state not in (DomainState.ABSENT, DomainState.SHUTOFF, DomainState.SAVED) and not staged:
            return None  # running: converge_domain checks again before any restart
        await asyncio.to_thread(self._plug, plan)
        if await asyncio.to_thread(self.unbound_ports, plan):
            self.networking.kick()  # bind what was just plugged without waiting for a resync
        if inst.spec.power_state == "Running" and state != DomainState.SAVED:
            # While the node binds the ports and serves their addresses.
            await asyncio.to_thread(self._stage, plan)
        unbound = await asyncio.to_thread(self.unbound_ports, plan)
        ports = self.op.store(Port)
        ready = all(
            p is not None and p.status.is_true("Ready")
            for p in (ports.lookup(n.port, inst.namespace) for n in plan.nics)
        )
        since = self._vif_wait.setdefault(inst.uid, time.monotonic())
        timeout = self.config.port_binding_timeout
        late = time.monotonic() - since >= timeout
        if not unbound and (ready or late):
            if not ready:
                log.warning("ports bound but not ready, booting", instance=inst.key)
            self._vif_wait.pop(inst.uid, None)
            return None
        if not late:
            return Outcome.observed({}, requeue_after=1)
        problem = Problem(
            "PortBindingTimeout",
            f"not started after {timeout:g} s: "
            + "; ".join(map(str, unbound))
            + f". It starts once its ports are bound on {self.node}",
        )
        error = node_problem(problem, self.node)
        if inst.status.node_problem != error:
            log.warning("ports not bound, not booting", instance=inst.key, why=problem.message)
        return Outcome.observed(
            InstanceStatus(node_problem=error, power_state=POWER.get(state, "Absent")).patch(),
            requeue_after=5,
        )

    def unbound_ports(self, plan: Plan) -> list[Unbound]:
        """The plan's ports a guest may not run on now (blocking: reads OVS)."""
        ports = self.op.store(Port)
        fresh = [(n.port, ports.lookup(n.port, plan.inst.namespace)) for n in plan.nics]
        return unbound_ports(fresh, self.node, self.vifs.switch.vif_ports())

    def _plug(self, plan: Plan) -> None:
        self.compute.plug(vif_plugs(plan))

    def _stage(self, plan: Plan) -> None:
        """Start the guest paused while its ports (plugged already) are wired
        (Nova starts it paused until the VIFs are plugged): the gate then
        only resumes it."""
        self.compute.stage(plan_guest(plan, self.facts(plan.inst)))

    async def forget(self, key: str) -> None:
        """The Instance left this node's cache: gone from the API (its
        finalizer was not ours, or it was deleted mid-move), or placed on
        another node (the cache holds only this node's instances): remove
        whatever this node still has, and this node's finalizer if the
        instance is still there. What it last looked like is kept until that
        worked, so a failed attempt is retried."""
        last = self._seen.get(key)
        if last is not None and self._holds(last):
            await asyncio.to_thread(self._teardown, last)
            await self.consoles.drop(last)
            await self._drop_finalizer(last)
        self._seen.pop(key, None)

    async def finalize(self, obj: Instance) -> Outcome | None:
        if self.own_finalizer in obj.metadata.finalizers:
            await asyncio.to_thread(self._teardown, obj)
            await self._drop_finalizer(obj)
            # Done: the object's removal from the cache has nothing left to undo.
            self._seen.pop(obj.key, None)
        return None

    async def _add_finalizer(self, obj: Instance) -> None:
        if self.own_finalizer not in obj.metadata.finalizers:
            await self.op.kube.set_finalizers(obj, [*obj.metadata.finalizers, self.own_finalizer])

    async def _drop_finalizer(self, obj: Instance) -> None:
        """Remove this node's finalizer, judged on a fresh read: the cached
        object may predate the finalizer, and the other writers of the list
        (the target node's agent during a move) make conflicts likely. The
        uid stays local until it is done, so a failure is retried."""
        for attempt in range(FINALIZER_ATTEMPTS):
            fresh = await self.op.kube.get(Instance, obj.name, obj.namespace)
            if fresh is None or fresh.uid != obj.uid:
                break
            if self.own_finalizer not in fresh.metadata.finalizers:
                break
            kept = [f for f in fresh.metadata.finalizers if f != self.own_finalizer]
            try:
                await self.op.kube.set_finalizers(fresh, kept)
                break
            except ApiError as e:
                if not e.conflict or attempt == FINALIZER_ATTEMPTS - 1:
                    raise
        self.local.discard(obj.uid)

    # --- planning (async: reads the caches and Secrets) ------------------------------

    async def _plan(
        self, inst: Instance, *, resources: ActionResources | None = None
    ) -> Plan | None:
        return await self.intents.plan(inst, resources=resources)

    def store_source(self, source: StoreSource) -> ImageSource:
        return self.intents.store_source(source)

    # --- node work (blocking, in a worker thread) -------------------------------------

    def rescue_disk(self, inst: Instance) -> Path:
        return self.instance_dir(inst) / "rescue.qcow2"

    def _virt_type(self) -> VirtType:
        if self.config.virt_type == "kvm":
            return "kvm"
        if self.config.virt_type == "qemu":
            return "qemu"
        return detect_virt_type(self.runner, self.config.state_dir)

    def converge_domain(self, plan: Plan) -> DomainState:
        """Plan the guest from the intent and this node's facts, then sync it."""
        guest = plan_guest(plan, self.facts(plan.inst))
        return self.compute.sync(guest, plan.inst.spec.power_state, lambda: self._may_start(plan))

    def _may_start(self, plan: Plan) -> bool:
        unbound = self.unbound_ports(plan)
        if unbound:
            log.info(
                "not starting: ports not bound",
                instance=plan.inst.key,
                why=[str(u) for u in unbound],
            )
        return not unbound

    def _shelve(self, plan: Plan) -> DiskTransfer | None:
        """Flatten the root disk into the image store; the controller then
        frees the node and this agent collects the rest."""
        inst = plan.inst
        if inst.status.shelved_disk:
            return inst.status.shelved_disk
        name = self.domain_name(inst)
        if plan.boot_volume is not None:
            # The root disk is the volume: stopping is all it takes to offload.
            self.compute.stop(name)
            return DiskTransfer(ref=f"volume:{plan.boot_volume.name}", sha256="")
        disk = self.instance_dir(inst) / "disk"
        if not disk.exists():
            return None
        self.compute.stop(name)
        ref = internal_ref("shelved", inst.uid)
        snap = self.compute.flatten(disk, internal_path(str(self.store_dir), ref))
        return DiskTransfer(ref=ref, sha256=snap.sha256)

    def _drop_shelved(self, ref: str) -> None:
        if not ref.startswith("volume:"):
            Path(internal_path(str(self.store_dir), ref)).unlink(missing_ok=True)

    def _teardown(self, inst: Instance) -> None:
        """Remove everything of the instance from this node."""
        self._remove_local(inst.uid)
        self.consoles.forget(inst)
        log.info("instance removed from node", instance=inst.key, node=self.node)

    def _remove_local(self, uid: str) -> None:
        # Every local name of an instance derives from its uid alone.
        self.compute.teardown(
            f"{DOMAIN_PREFIX}{uid}-{self.node_tag}",
            self.root / uid,
            f"{SECRET_PREFIX}{uid}-",
            f"-{self.node_tag}",
        )
        self._failures.pop(uid, None)
        self._prune_image_cache()

    async def prune_image_cache(self) -> None:
        await asyncio.to_thread(self._prune_image_cache)

    def _prune_image_cache(self) -> None:
        self.compute.prune_image_cache(self.config.image_cache_grace)


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
