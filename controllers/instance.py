"""Instance: flavor and boot source checks, scheduling, ports, and readiness.

What an instance *is* right now (flavor, image, node, rescue) follows from
its spec and the InstanceAction records that completed since: a Resize
changes the flavor, a Rebuild the image, a Migrate or Resize the node. The
node agent runs the domain and reports what it observes; this reconciler
owns the conditions.

(About 490 lines: the checks, scheduling, ports, floating addresses and the node intent
are steps of one converge function.)
"""

from __future__ import annotations

from typing import Any

import structlog

from nubes.api.compute import (
    Flavor,
    Hypervisor,
    Instance,
    InstanceAction,
    InstanceAddress,
    InstanceStatus,
)
from nubes.api.image import Image
from nubes.api.lifecycle import incoming_node, placement
from nubes.api.meta import now_precise
from nubes.api.network import FixedIpRequest, FloatingIP, Network, Port, PortSpec
from nubes.api.storage import Volume
from nubes.controllers.access import index_projects, require_flavor
from nubes.controllers.compute_scheduler import (
    Choice,
    HostState,
    RequestSpec,
    schedule,
    traits_from_extra_specs,
)
from nubes.controllers.hypervisor import usable
from nubes.controllers.image import resolve_image
from nubes.controllers.indexes import (
    index_actions,
    index_floating_ips,
    index_instances,
    index_ports,
)
from nubes.controllers.intent import node_intent
from nubes.controllers.lifecycle import Effective, effective
from nubes.controllers.quota import hold, instance_amounts, quota_refusal, requeue_refused
from nubes.controllers.storage import agent_problem
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

log = structlog.get_logger()

GIB = 2**30
COMPUTE_OWNER = "compute:nova"


def port_name(inst: Instance, index: int) -> str:
    return f"{inst.name}-{index}"


def host_states(op: Operator, exclude_uid: str) -> list[HostState]:
    """Nodes with the usage of the instances placed on them."""
    usage: dict[str, list[int]] = {}
    for other in op.store(Instance):
        node = other.status.node
        if node and other.uid != exclude_uid:
            used = usage.setdefault(node, [0, 0, 0])
            used[0] += other.status.vcpus or 0
            used[1] += other.status.ram_mib or 0
            used[2] += other.status.disk_gib or 0
    hosts = []
    for hv in op.store(Hypervisor):
        used = usage.get(hv.name, [0, 0, 0])
        hosts.append(
            HostState(
                name=hv.name,
                zone=hv.spec.availability_zone,
                usable=usable(hv),
                vcpus=hv.status.vcpus or 0,
                ram_mib=hv.status.ram_mib or 0,
                disk_gib=hv.status.disk_gib or 0,
                vcpus_used=used[0],
                ram_mib_used=used[1],
                disk_gib_used=used[2],
                cpu_allocation_ratio=hv.spec.cpu_allocation_ratio,
                ram_allocation_ratio=hv.spec.ram_allocation_ratio,
                disk_allocation_ratio=hv.spec.disk_allocation_ratio,
                reserved_ram_mib=hv.spec.reserved_ram_mib,
                traits=frozenset(hv.spec.traits),
                hypervisor_type=hv.status.hypervisor_type or "QEMU",
            )
        )
    return hosts


def request_for(
    flavor: Flavor, image: Image | None, disk_gib: int, zone: str | None
) -> RequestSpec:
    required, forbidden = traits_from_extra_specs(flavor.spec.extra_specs)
    return RequestSpec(
        vcpus=flavor.spec.vcpus,
        ram_mib=flavor.spec.ram_mib,
        disk_gib=disk_gib,
        zone=zone,
        required_traits=required,
        forbidden_traits=forbidden,
        image_properties=dict(image.spec.properties) if image else {},
    )


def root_disk_gib(flavor: Flavor, image: Image | None) -> int:
    """The flavor's disk, or the image's virtual size rounded up when 0."""
    if flavor.spec.disk_gib:
        return flavor.spec.disk_gib
    if image is None:
        return 0
    return max(1, -(-(image.status.virtual_size_bytes or 0) // GIB))


def check_fit(flavor: Flavor, image: Image) -> None:
    virtual = image.status.virtual_size_bytes or 0
    if flavor.spec.disk_gib and virtual > flavor.spec.disk_gib * GIB:
        raise Stall(
            "ImageTooLarge",
            f"image {image.name} needs a {virtual / GIB:.2f} GiB disk but flavor "
            f"{flavor.name} has {flavor.spec.disk_gib} GiB",
        )
    if (
        image.spec.min_disk_gib
        and flavor.spec.disk_gib
        and image.spec.min_disk_gib > flavor.spec.disk_gib
    ):
        raise Stall(
            "FlavorDiskTooSmall",
            f"image {image.name} requires at least {image.spec.min_disk_gib} GiB of disk; "
            f"flavor {flavor.name} has {flavor.spec.disk_gib}",
        )
    if image.spec.min_ram_mib > flavor.spec.ram_mib:
        raise Stall(
            "FlavorRamTooSmall",
            f"image {image.name} requires at least {image.spec.min_ram_mib} MiB of RAM; "
            f"flavor {flavor.name} has {flavor.spec.ram_mib}",
        )


class InstanceReconciler(Reconciler[Instance]):
    kind = Instance
    workers = 8

    def __init__(self) -> None:
        self._scheduled: dict[str, str] = {}

    def setup(self, op: Operator) -> None:
        super().setup(op)
        instances = op.store(Instance)
        index_instances(op)
        instances.add_index("flavor", lambda i: [i.spec.flavor])
        instances.add_index(
            "image",
            lambda i: (
                [f"{i.spec.image.namespace or i.namespace}/{i.spec.image.name}"]
                if i.spec.image
                else []
            ),
        )
        instances.add_index(
            "volume", lambda i: [f"{i.namespace}/{v}" for v in self._volume_names(i)]
        )
        index_actions(op)
        index_ports(op)
        index_floating_ips(op)
        op.store(Network)
        op.store(Volume)
        op.store(Image)
        index_projects(op)
        requeue_refused(op, Instance)

        op.watch(Flavor, Instance, lambda f: [i.key for i in instances.by_index("flavor", f.name)])
        op.watch(
            Image,
            Instance,
            lambda img: [i.key for i in instances.by_index("image", img.key)],
            # Readiness, and sharing (a spec change) decide who may boot it.
            when=lambda old, new: _condition_changed(old, new) or _spec(old) != _spec(new),
        )
        op.watch(
            InstanceAction,
            Instance,
            lambda a: [f"{a.namespace}/{a.spec.instance}"],
            when=lambda old, new: _completion(old) != _completion(new),
        )
        op.watch(
            Port,
            Instance,
            lambda p: (
                [i.key for i in instances.by_index("uid", p.spec.device_id)]
                if p.spec.device_id
                else []
            ),
            when=_port_changed,
        )
        op.watch(
            FloatingIP,
            Instance,
            lambda f: [
                i.key
                for p in [op.store(Port).lookup(f.spec.port, f.namespace)]
                if f.spec.port and p is not None and p.spec.device_id
                for i in instances.by_index("uid", p.spec.device_id)
            ],
            when=lambda old, new: _floating(old) != _floating(new),
        )
        op.watch(
            Volume,
            Instance,
            lambda v: [i.key for i in instances.by_index("volume", v.key)],
            when=_condition_changed,
        )
        # Capacity changes may unblock instances nobody could place.
        op.watch(
            Hypervisor,
            Instance,
            lambda _: [i.key for i in instances if not i.status.node],
            when=lambda old, new: _hv_facts(old) != _hv_facts(new),
        )

    def _floating_addresses(self, port: Port) -> list[str]:
        """The port's floating IPs once the router applies them (Ready)."""
        return sorted(
            f.status.floating_ip_address
            for f in self.op.store(FloatingIP).by_index("fip-port", port.key)
            if f.status.floating_ip_address
            and f.status.port_uid == port.uid
            and f.status.is_true("Ready")
            and not f.deleting
        )

    @staticmethod
    def _volume_names(inst: Instance) -> list[str]:
        names = [v.volume for v in inst.spec.volumes]
        if inst.spec.boot_volume:
            names.append(inst.spec.boot_volume.name)
        return names

    # --- converge ------------------------------------------------------------------

    async def converge(self, obj: Instance) -> Outcome:
        actions = self.op.store(InstanceAction).by_index("instance", obj.key)
        eff = effective(obj, actions)
        flavor = self.op.store(Flavor).lookup(eff.flavor)
        if flavor is None:
            raise Stall("FlavorNotFound", f"flavor {eff.flavor} does not exist")
        if obj.status.node_since is None:
            # Access is checked before the first placement only: as in Nova,
            # removing a project from the list leaves its instances alone.
            require_flavor(self.op, flavor, obj.namespace or "")
        # Cores and RAM are reserved first (Nova checks them when the request
        # arrives), so an instance waiting for its image or a node holds them.
        want, held = instance_amounts(obj, flavor)
        await hold(self.op, obj, want, held=held, what="instance")
        image: Image | None = None
        if eff.image is not None:
            image = resolve_image(self.op, eff.image, obj.namespace or "")
            check_fit(flavor, image)
        elif obj.spec.boot_volume is not None:
            self._check_boot_volume(obj)
        disk_gib = root_disk_gib(flavor, image)

        node, since = self._placement(obj, eff, flavor, image, disk_gib)
        if obj.uid in self._scheduled:
            await self.op.kube.event(obj, "Scheduled", self._scheduled.pop(obj.uid))
        typed = InstanceStatus(
            node=node,
            node_since=since,
            incoming_node=incoming_node(actions, node),
            flavor=flavor.name,
            image=f"{eff.image.namespace or obj.namespace}/{eff.image.name}" if eff.image else None,
            vcpus=flavor.spec.vcpus if node else None,
            ram_mib=flavor.spec.ram_mib if node else None,
            disk_gib=disk_gib if node else None,
            rescued=eff.rescued,
        )
        if node is None:
            if obj.spec.power_state == "Shelved" and obj.status.shelved_disk:
                typed.addresses = []
                return Outcome.ready(typed, "shelved: the disk is in the image store")
            raise Wait("Scheduling", "waiting for a node", 5)
        ports = await self._ensure_ports(obj)
        typed.intent = node_intent(obj, flavor, image, disk_gib, eff, ports, actions)
        typed.addresses = [
            InstanceAddress(
                network=p.spec.network.name,
                port=p.name,
                mac_address=p.status.mac_address or "",
                ip_addresses=[f.ip_address for f in p.status.fixed_ips],
                floating_ip_addresses=self._floating_addresses(p),
            )
            for p in ports
        ]
        # What the node agent cannot do (a port not bound in time), with its reason.
        reported = obj.status.node_problem
        if reported is not None and reported.node not in (None, node):
            reported = None  # from the node the instance left
        problem = agent_problem(reported, f"node {node}", typed)
        if problem is not None:
            return problem
        waiting = self._waiting_for(obj, ports)
        if waiting:
            return Outcome.progressing(waiting[0], waiting[1], typed)
        ips = ", ".join(ip for p in ports for ip in (f.ip_address for f in p.status.fixed_ips))
        return Outcome.ready(
            typed, f"{obj.status.power_state} on {node}" + (f", {ips}" if ips else "")
        )

    def _check_boot_volume(self, obj: Instance) -> None:
        assert obj.spec.boot_volume is not None
        name = obj.spec.boot_volume.name
        volume: Volume | None = self.op.store(Volume).lookup(name, obj.namespace)
        if volume is None:
            raise Wait("BootVolumeNotFound", f"volume {name} does not exist", 5)
        backing = volume.status.backing
        if backing is None or not backing.source_done:
            raise Wait("WaitingForBootVolume", f"volume {name} is still being created", 5)
        if not volume.status.bootable:
            raise Stall("VolumeNotBootable", f"volume {name} is not bootable")

    def _placement(
        self, obj: Instance, eff: Effective, flavor: Flavor, image: Image | None, disk_gib: int
    ) -> tuple[str | None, str | None]:
        """(node, since): sticky; moved by completed moves; cleared when shelved."""
        node, since = placement(obj, eff.move)
        if obj.spec.power_state == "Shelved" and obj.status.shelved_disk:
            return None, since  # shelved and offloaded: node resources freed
        if node is not None and self.op.store(Hypervisor).lookup(node) is not None:
            return node, since
        result = schedule(
            host_states(self.op, obj.uid),
            request_for(flavor, image, disk_gib, obj.spec.availability_zone),
        )
        if not isinstance(result, Choice):
            raise Stall("NoValidHost", result.explanation)
        log.info("scheduled", instance=obj.key, node=result.host)
        self._scheduled[obj.uid] = (
            f"scheduled to {result.host} ({result.considered} nodes considered)"
        )
        return result.host, now_precise()

    async def _ensure_ports(self, obj: Instance) -> list[Port]:
        store = self.op.store(Port)
        wanted: list[Port] = []
        created_names = set()
        for index, nic in enumerate(obj.spec.networks):
            if nic.port is not None:
                port: Port | None = store.lookup(nic.port, obj.namespace)
                if port is None:
                    raise Wait("PortNotFound", f"port {nic.port} does not exist", 5)
                if port.spec.device_id not in ("", obj.uid):
                    raise Stall("PortInUse", f"port {nic.port} is used by {port.spec.device_id}")
                for other in self.op.store(Instance):
                    if (
                        other.uid != obj.uid
                        and other.namespace == obj.namespace
                        and any(n.port == nic.port for n in other.spec.networks)
                    ):
                        raise Stall(
                            "PortInUse", f"port {nic.port} is used by instance {other.name}"
                        )
                wanted.append(port)
                continue
            assert nic.network is not None
            name = port_name(obj, index)
            created_names.add(name)
            spec = PortSpec(
                network=nic.network,
                fixed_ips=[FixedIpRequest(ip_address=nic.fixed_ip)] if nic.fixed_ip else None,
                device_owner=COMPUTE_OWNER,
                device_id=obj.uid,
                security_groups=obj.spec.security_groups,
            )
            existing = store.lookup(name, obj.namespace)
            if existing is not None and existing.spec.device_id != obj.uid:
                raise Stall("PortNameTaken", f"port {name} exists and belongs to something else")
            if existing is None or existing.spec.wire() != spec.wire():
                try:
                    await self.op.kube.apply_raw(path_of(Port), self._port_body(obj, name, spec))
                except ApiError as e:
                    # The project's ports quota (ResourceQuota admission).
                    if (refused := quota_refusal(e)) is None:
                        raise
                    raise Stall("QuotaExceeded", f"port {name}: {refused}") from e
            if existing is not None:
                wanted.append(existing)
        for port in store.by_index("device", obj.uid):
            if (
                port.namespace == obj.namespace
                and port.name not in created_names
                and _owned_by(port, obj)
            ):
                await self.op.kube.delete(port)
        return wanted

    @staticmethod
    def _port_body(obj: Instance, name: str, spec: PortSpec) -> dict[str, Any]:
        return {
            "apiVersion": Port.crd.api_version,
            "kind": "Port",
            "metadata": {
                "name": name,
                "namespace": obj.namespace,
                # Deleting the instance deletes the ports it made.
                "ownerReferences": [
                    {
                        "apiVersion": Instance.crd.api_version,
                        "kind": "Instance",
                        "name": obj.name,
                        "uid": obj.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": spec.wire(),
        }

    def _waiting_for(self, obj: Instance, ports: list[Port]) -> tuple[str, str] | None:
        if len(ports) < len(obj.spec.networks):
            return "CreatingPorts", "creating ports"
        for port in ports:
            if port.status.is_true("Stalled"):
                cond = port.status.condition("Stalled")
                raise Stall("PortFailed", f"port {port.name}: {cond.message if cond else ''}")
        desired = obj.spec.power_state
        observed = obj.status.power_state
        if observed != desired:
            return "PowerStateConverging", f"{observed or 'not created'}, want {desired}"
        unready = [p.name for p in ports if not p.status.is_true("Ready")]
        if unready and desired == "Running":
            return "WaitingForPorts", f"ports not ready: {', '.join(unready)}"
        return None


def _owned_by(port: Port, inst: Instance) -> bool:
    return any(ref.get("uid") == inst.uid for ref in port.metadata.owner_references)


def _completion(action: InstanceAction | None) -> tuple[Any, ...] | None:
    if action is None:
        return None
    return (action.status.completed_at, action.status.error is None)


def _spec(obj: Any) -> Any:
    return obj.spec if obj is not None else None


def _condition_changed(old: Any, new: Any) -> bool:
    def facts(obj: Any) -> tuple[Any, ...] | None:
        if obj is None:
            return None
        return tuple((c.type, c.status) for c in obj.status.conditions), obj.deleting

    return facts(old) != facts(new)


def _floating(f: FloatingIP | None) -> tuple[Any, ...] | None:
    if f is None:
        return None
    return (f.status.floating_ip_address, f.status.port_uid, f.status.is_true("Ready"), f.deleting)


def _port_changed(old: Port | None, new: Port | None) -> bool:
    def facts(p: Port | None) -> tuple[Any, ...] | None:
        if p is None:
            return None
        return (
            p.status.is_true("Ready"),
            p.status.is_true("Stalled"),
            p.status.mac_address,
            tuple(f.ip_address for f in p.status.fixed_ips),
            p.status.mtu,  # the NICs of the node intent
            p.status.network_uid,
        )

    return facts(old) != facts(new)


def _hv_facts(hv: Hypervisor | None) -> tuple[Any, ...] | None:
    if hv is None:
        return None
    return (hv.status.is_true("Ready"), hv.spec.disabled, hv.status.vcpus, hv.status.ram_mib)
