"""Router: validated interfaces, a gateway on an external network, and a node.

The router's addresses are Ports (as Neutron's router_interface and
router_gateway ports): the interface ports sit on the tenant subnets with the
subnet's gateway address, the gateway port sits on the external network in
that network's own namespace, so tenants never see it or any other port of
the external network. The ports get their MACs and addresses from the same
IPAM as every port, and are bound to the router's node, so the node's
networking loop gives them their local VLANs like any other port.

The router is placed on a live node whose agent runs with --l3 and moved when
that node's heartbeat dies (Neutron's L3 scheduler with
allow_automatic_l3agent_failover); its ports follow it.

(About 430 lines: validation, the router's own ports and placement belong to
one converge function and share its state.)
"""

from __future__ import annotations

import ipaddress
from typing import Any

import structlog

from nubes.api.compute import Hypervisor
from nubes.api.meta import ProjectRef
from nubes.api.network import (
    FixedIpRequest,
    FloatingIP,
    Network,
    Port,
    PortBinding,
    PortSpec,
    Router,
    RouterPortStatus,
    RouterStatus,
    Subnet,
)
from nubes.controllers.hypervisor import alive
from nubes.controllers.ipam import overlaps
from nubes.controllers.network import ROUTER_GATEWAY, ROUTER_INTERFACE, rendezvous
from nubes.controllers.subnet import plan_of
from nubes.runtime.kube import path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall, Wait

log = structlog.get_logger()


def interface_port_name(router: Router, subnet: str) -> str:
    return f"{router.name}-rif-{subnet}"[:253]


def gateway_port_name(router: Router) -> str:
    # In the external network's namespace: the uid keeps routers of
    # different projects apart there.
    return f"rgw-{router.uid}"


def l3_nodes(op: Operator) -> list[str]:
    return sorted(
        hv.name
        for hv in op.store(Hypervisor)
        if alive(hv) and hv.status.l3_agent and not hv.spec.disabled
    )


def external_ref(router: Router) -> tuple[str, str] | None:
    gw = router.spec.external_gateway
    if gw is None:
        return None
    return gw.network.namespace or router.namespace or "", gw.network.name


def ready_v4_subnets(op: Operator, net: Network) -> list[Subnet]:
    found = [
        s
        for s in op.store(Subnet).by_index("network", net.key)
        if s.status.is_true("Ready") and not s.deleting and s.spec.ip_version == 4
    ]
    return sorted(found, key=lambda s: (s.metadata.creation_timestamp or "", s.name))


class RouterReconciler(Reconciler[Router]):
    kind = Router
    finalizer = "network.nubes.io/router"
    workers = 2

    def setup(self, op: Operator) -> None:
        super().setup(op)
        routers = op.store(Router)
        routers.add_index("l3-uid", lambda r: [r.uid])
        routers.add_index(
            "l3-subnet", lambda r: [f"{r.namespace}/{i.subnet}" for i in r.spec.interfaces]
        )
        routers.add_index(
            "l3-extnet", lambda r: ["/".join(ref)] if (ref := external_ref(r)) else []
        )
        ports = op.store(Port)
        ports.add_index(
            "l3-router",
            lambda p: (
                [p.spec.device_id]
                if p.spec.device_owner in (ROUTER_INTERFACE, ROUTER_GATEWAY)
                else []
            ),
        )
        fips = op.store(FloatingIP)
        fips.add_index(
            "l3-router", lambda f: [f"{f.namespace}/{f.status.router}"] if f.status.router else []
        )

        def by_subnet(s: Subnet) -> list[str]:
            keys = {r.key for r in routers.by_index("l3-subnet", s.key)}
            keys.update(
                r.key for r in routers.by_index("l3-extnet", f"{s.namespace}/{s.spec.network.name}")
            )
            return sorted(keys)

        op.watch(Subnet, Router, by_subnet)
        op.watch(Network, Router, lambda n: [r.key for r in routers.by_index("l3-extnet", n.key)])
        op.watch(
            Port,
            Router,
            lambda p: [r.key for r in routers.by_index("l3-uid", p.spec.device_id)],
        )
        op.watch(
            FloatingIP,
            Router,
            lambda f: [f"{f.namespace}/{f.status.router}"] if f.status.router else [],
        )
        op.watch(
            Hypervisor,
            Router,
            lambda _: [r.key for r in routers],
            when=lambda old, new: _l3_facts(old) != _l3_facts(new),
        )

    # --- validation ----------------------------------------------------------------

    def _interfaces(self, router: Router) -> list[Subnet]:
        subnets: list[Subnet] = []
        for iface in router.spec.interfaces:
            subnet = self.op.store(Subnet).lookup(iface.subnet, router.namespace)
            if subnet is None or subnet.deleting:
                raise Stall(
                    "SubnetNotFound",
                    f"interfaces: subnet {iface.subnet} does not exist in this project"
                    " (a router attaches only its own project's subnets)",
                )
            if not subnet.status.is_true("Ready"):
                raise Wait("SubnetNotReady", f"subnet {iface.subnet} is not ready", 5)
            if subnet.spec.ip_version != 4:
                raise Stall(
                    "UnsupportedIpVersion",
                    f"interfaces: subnet {iface.subnet} is IPv6; routers route IPv4 only",
                )
            if not subnet.status.gateway_ip:
                raise Stall(
                    "SubnetHasNoGateway",
                    f"interfaces: subnet {iface.subnet} has no gateway address (noGateway)"
                    " for the router to take",
                )
            subnets.append(subnet)
        self._no_overlap(subnets)
        return subnets

    @staticmethod
    def _no_overlap(subnets: list[Subnet], external: Subnet | None = None) -> None:
        named = [(s.name, s.spec.cidr) for s in subnets]
        if external is not None:
            named.append((f"{external.name} (external)", external.spec.cidr))
        for i, (a, cidr_a) in enumerate(named):
            for b, cidr_b in named[i + 1 :]:
                if overlaps(cidr_a, cidr_b):
                    raise Stall(
                        "SubnetsOverlap",
                        f"interfaces: subnet {a} ({cidr_a}) overlaps subnet {b} ({cidr_b})"
                        " on this router",
                    )

    def _external(self, router: Router) -> tuple[Network, Subnet] | None:
        ref = external_ref(router)
        if ref is None:
            return None
        namespace, name = ref
        net = self.op.store(Network).lookup(name, namespace)
        if net is None or net.deleting:
            raise Stall(
                "ExternalNetworkNotFound",
                f"externalGateway.network: network {namespace}/{name} does not exist",
            )
        if not net.spec.external:
            raise Stall(
                "NetworkNotExternal",
                f"externalGateway.network: network {namespace}/{name} is not an external network",
            )
        subnets = ready_v4_subnets(self.op, net)
        if not subnets:
            raise Wait("ExternalSubnetNotReady", f"network {name} has no ready IPv4 subnet", 5)
        wanted = router.spec.external_gateway.fixed_ip if router.spec.external_gateway else None
        if wanted:
            address = ipaddress.ip_address(wanted)
            matches = [s for s in subnets if address in ipaddress.ip_network(s.spec.cidr)]
            if not matches:
                raise Stall(
                    "IpAddressNotInSubnet",
                    f"externalGateway.fixedIp: {wanted} is in no subnet of network {name}",
                )
            # As for floating IPs: outside the pools is the operator's (what
            # the router holds already, from before this rule, it keeps).
            held = router.status.gateway_port
            if not plan_of(matches[0]).in_pool(address) and (
                held is None or held.ip_address != wanted
            ):
                raise Stall(
                    "IpAddressNotInPool",
                    f"externalGateway.fixedIp: {wanted} is outside the allocation pools of"
                    f" subnet {matches[0].name}",
                )
            return net, matches[0]
        return net, subnets[0]

    def _needed_by_floating_ips(self, router: Router) -> list[tuple[FloatingIP, str]]:
        """(floating IP, subnet name) of the interfaces floating IPs use now."""
        result = []
        for fip in self.op.store(FloatingIP).by_index("l3-router", router.key):
            if fip.deleting or not fip.spec.port or not fip.status.fixed_ip_address:
                continue
            address = ipaddress.ip_address(fip.status.fixed_ip_address)
            for iface in router.status.interfaces:
                if address in ipaddress.ip_network(iface.cidr):
                    result.append((fip, iface.subnet))
        return result

    # --- ports -------------------------------------------------------------------------

    def _node(self, router: Router) -> str | None:
        nodes = l3_nodes(self.op)
        current = router.status.node
        if current in nodes:
            return current
        node = rendezvous(router.uid, nodes)
        if node != current:
            log.info("router placed", router=router.key, node=node, previous=current)
        return node

    async def _ensure_port(
        self, router: Router, name: str, namespace: str, spec: PortSpec, owned: bool
    ) -> Port | None:
        port: Port | None = self.op.store(Port).lookup(name, namespace)
        if port is not None and port.spec.device_id != router.uid:
            raise Stall("PortNameTaken", f"port {namespace}/{name} exists and is not this router's")
        if port is None or port.spec.wire() != spec.wire():
            metadata: dict[str, Any] = {"name": name, "namespace": namespace}
            if owned:
                metadata["ownerReferences"] = [
                    {
                        "apiVersion": Router.crd.api_version,
                        "kind": "Router",
                        "name": router.name,
                        "uid": router.uid,
                        "controller": True,
                    }
                ]
            body = {
                "apiVersion": Port.crd.api_version,
                "kind": "Port",
                "metadata": metadata,
                "spec": spec.wire(),
            }
            # The router's ports are this controller's children: it owns their spec.
            await self.op.kube.apply_raw(path_of(Port), body)
        return port

    async def _remove_ports(self, router: Router, keep: set[str]) -> list[Port]:
        """Delete the router's ports not in `keep` (keys); returns those still there."""
        left = []
        for port in self.op.store(Port).by_index("l3-router", router.uid):
            if port.key in keep:
                continue
            left.append(port)
            if not port.deleting:
                await self.op.kube.delete(port)
        return left

    # --- converge ----------------------------------------------------------------------

    async def converge(self, obj: Router) -> Outcome:
        subnets = self._interfaces(obj)
        # Interfaces and the gateway that floating IPs still map through stay
        # as they are, as Neutron refuses to remove them
        # (RouterInterfaceInUseByFloatingIP): nothing of the change is applied.
        attached = {s.name for s in subnets}
        for fip, subnet_name in self._needed_by_floating_ips(obj):
            if subnet_name not in attached:
                raise Stall(
                    "RouterInterfaceInUse",
                    f"interfaces: the interface on subnet {subnet_name} cannot be removed:"
                    f" floating IP {fip.name} maps {fip.status.fixed_ip_address} through it;"
                    " disassociate it first",
                )
        external = self._external(obj)
        if external is None and self._needed_by_floating_ips(obj):
            raise Stall(
                "GatewayInUse",
                "externalGateway cannot be removed while floating IPs use this router",
            )
        ext_subnet = external[1] if external else None
        self._no_overlap(subnets, ext_subnet)
        node = self._node(obj)
        keep: set[str] = set()
        interfaces: list[RouterPortStatus] = []
        ready = True
        waiting = ""
        for subnet in sorted(subnets, key=lambda s: s.name):
            name = interface_port_name(obj, subnet.name)
            spec = PortSpec(
                network=ProjectRef(name=subnet.spec.network.name),
                fixed_ips=[FixedIpRequest(subnet=subnet.name, ip_address=subnet.status.gateway_ip)],
                device_owner=ROUTER_INTERFACE,
                device_id=obj.uid,
                binding=PortBinding(host=node),
                # A router forwards other hosts' addresses: no anti-spoofing.
                port_security_enabled=False,
            )
            port = await self._ensure_port(obj, name, obj.namespace or "", spec, owned=True)
            keep.add(f"{obj.namespace}/{name}")
            prefix = ipaddress.ip_network(subnet.spec.cidr).prefixlen
            interfaces.append(
                RouterPortStatus(
                    name=name,
                    namespace=obj.namespace or "",
                    subnet=subnet.name,
                    cidr=subnet.spec.cidr,
                    ip_address=f"{subnet.status.gateway_ip}/{prefix}",
                )
            )
            if port is None or not port.status.is_true("Ready"):
                ready = False
                waiting = waiting or f"port {name}: {_why(port)}"
        # Without a gateway its fields are cleared explicitly (None is written).
        gateway_ip: str | None = None
        gateway_port: RouterPortStatus | None = None
        external_network_uid: str | None = None
        enable_snat: bool | None = None
        if external is not None:
            net, ext_subnet = external
            gw = obj.spec.external_gateway
            assert gw is not None
            name = gateway_port_name(obj)
            spec = PortSpec(
                network=ProjectRef(name=net.name),
                fixed_ips=[FixedIpRequest(subnet=ext_subnet.name, ip_address=gw.fixed_ip)],
                device_owner=ROUTER_GATEWAY,
                device_id=obj.uid,
                binding=PortBinding(host=node),
                port_security_enabled=False,
            )
            port = await self._ensure_port(obj, name, net.namespace or "", spec, owned=False)
            keep.add(f"{net.namespace}/{name}")
            address = next((f.ip_address for f in (port.status.fixed_ips if port else [])), None)
            if port is not None and port.status.is_true("Stalled"):
                cond = port.status.condition("Stalled")
                raise Stall(
                    cond.reason if cond else "GatewayPortFailed",
                    f"externalGateway: {cond.message if cond else 'gateway port failed'}",
                )
            if port is None or not port.status.is_true("Ready") or address is None:
                ready = False
                waiting = waiting or f"gateway port: {_why(port)}"
            if address is not None:
                prefix = ipaddress.ip_network(ext_subnet.spec.cidr).prefixlen
                gateway_ip = address
                gateway_port = RouterPortStatus(
                    name=name,
                    namespace=net.namespace or "",
                    subnet=ext_subnet.name,
                    cidr=ext_subnet.spec.cidr,
                    ip_address=f"{address}/{prefix}",
                    gateway_ip=ext_subnet.status.gateway_ip,
                )
            external_network_uid = net.uid
            enable_snat = gw.enable_snat
        status = RouterStatus(
            node=node,
            interfaces=interfaces,
            routes=list(obj.spec.routes),
            gateway_ip=gateway_ip,
            gateway_port=gateway_port,
            external_network_uid=external_network_uid,
            enable_snat=enable_snat,
        )
        await self._remove_ports(obj, keep)
        for port in (self.op.store(Port).lookup(n.name, n.namespace) for n in interfaces):
            if port is not None and port.status.is_true("Stalled"):
                cond = port.status.condition("Stalled")
                raise Stall(
                    cond.reason if cond else "InterfacePortFailed",
                    f"interfaces: {cond.message if cond else 'interface port failed'}",
                )
        summary = f"{len(interfaces)} interface(s)" + (
            f", gateway {gateway_ip}" if gateway_ip else ""
        )
        if node is None:
            return Outcome.progressing(
                "WaitingForL3Node",
                f"{summary}; no live node runs an L3 agent (agent flag --l3)",
                status,
                requeue_after=10,
            )
        if not ready:
            return Outcome.progressing("WaitingForPorts", f"{summary}; {waiting}", status)
        l3 = obj.status.l3
        if l3 is None or l3.node != node or obj.status.node != node:
            return Outcome.progressing(
                "WaitingForAgent", f"{summary}; not yet set up on node {node}", status
            )
        if not l3.ready:
            return Outcome.stalled(
                "RouterSetupFailed", f"{summary}; node {node} failed: {l3.error}", status
            )
        return Outcome.ready(status, f"{summary} on node {node}")

    async def finalize(self, obj: Router) -> Outcome | None:
        left = await self._remove_ports(obj, set())
        if left:
            return Outcome.progressing(
                "RemovingPorts",
                f"deleting {len(left)} router port(s): "
                + ", ".join(sorted(p.key for p in left)[:5]),
                requeue_after=1,
            )
        return None


def _why(port: Port | None) -> str:
    if port is None:
        return "being created"
    cond = port.status.condition("Reconciling") or port.status.condition("Stalled")
    return cond.message if cond is not None else "not ready"


def _l3_facts(hv: Hypervisor | None) -> tuple[Any, ...] | None:
    if hv is None:
        return None
    return hv.status.is_true("Ready"), hv.spec.disabled, hv.status.l3_agent
