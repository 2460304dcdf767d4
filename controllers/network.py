"""Network: segmentation id, MTU, DHCP placement, and safe deletion."""

from __future__ import annotations

import hashlib
from typing import Any

import structlog

from nubes.api.compute import Hypervisor
from nubes.api.meta import ProjectRef
from nubes.api.network import (
    FixedIpRequest,
    Network,
    NetworkStatus,
    Port,
    PortBinding,
    PortSpec,
    Subnet,
)
from nubes.controllers.allocations import Ledger
from nubes.controllers.config import ControllerConfig
from nubes.controllers.hypervisor import usable
from nubes.controllers.segments import candidates, derived_mtu, segment_pool, valid_segment
from nubes.runtime.kube import path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall

log = structlog.get_logger()

DHCP_OWNER = "network:dhcp"
ROUTER_INTERFACE = "network:router_interface"
ROUTER_GATEWAY = "network:router_gateway"


def dhcp_port_name(network: Network) -> str:
    return f"{network.name}-dhcp"


def rendezvous(key: str, nodes: list[str]) -> str | None:
    """Stable choice of a node for a key; moves few keys when nodes change."""
    if not nodes:
        return None
    return max(nodes, key=lambda n: hashlib.sha256(f"{key}/{n}".encode()).digest())


def ready_nodes(op: Operator, zones: list[str] | None = None) -> list[str]:
    return sorted(
        hv.name
        for hv in op.store(Hypervisor)
        if usable(hv) and (not zones or hv.spec.availability_zone in zones)
    )


class NetworkReconciler(Reconciler[Network]):
    kind = Network
    finalizer = "network.nubes.io/network"
    workers = 4

    def __init__(self, config: ControllerConfig):
        self.config = config

    def setup(self, op: Operator) -> None:
        super().setup(op)
        self.ledger = Ledger(op)
        subnets = op.store(Subnet)
        subnets.add_index("network", lambda s: [f"{s.namespace}/{s.spec.network.name}"])
        ports = op.store(Port)
        ports.add_index(
            "network",
            lambda p: [f"{p.spec.network.namespace or p.namespace}/{p.spec.network.name}"],
        )
        op.watch(Subnet, Network, lambda s: [f"{s.namespace}/{s.spec.network.name}"])
        op.watch(
            Port,
            Network,
            lambda p: [f"{p.spec.network.namespace or p.namespace}/{p.spec.network.name}"],
            when=lambda old, new: old is None or new is None,
        )
        op.watch(
            Hypervisor,
            Network,
            lambda _: [n.key for n in op.store(Network)],
            when=lambda old, new: _readiness(old) != _readiness(new),
        )

    def accepts(self, obj: Network) -> bool:
        return self.op.owns_shard(obj.uid)

    # --- segmentation -----------------------------------------------------------

    def _ranges(self, net: Network) -> list[tuple[int, int]]:
        if net.spec.type == "vxlan":
            return [(r.first, r.last) for r in self.config.vxlan_ranges]
        if net.spec.type == "gre":
            return [(r.first, r.last) for r in self.config.gre_ranges]
        if net.spec.type == "vlan":
            return [
                (r.first, r.last)
                for r in self.config.vlan_ranges
                if r.physical_network == net.spec.physical_network
            ]
        return []

    async def _segment(self, net: Network) -> int | None:
        pool = segment_pool(net.spec.type, net.spec.physical_network)
        if pool is None:
            return None
        if net.spec.type == "flat":
            if not await self.ledger.claim(pool, "flat", net):
                holder = self.ledger.holder(pool, "flat")
                raise Stall(
                    "PhysicalNetworkInUse",
                    f"physical network {net.spec.physical_network} already carries flat "
                    f"network {_owner_of(holder)}",
                )
            return None
        wanted = net.spec.segmentation_id or net.status.segmentation_id
        if wanted is not None:
            if not valid_segment(net.spec.type, wanted):
                raise Stall("InvalidSegmentationId", f"{wanted} is not a valid {net.spec.type} id")
            if await self.ledger.claim(pool, str(wanted), net):
                return wanted
            if net.spec.segmentation_id is not None:
                holder = self.ledger.holder(pool, str(wanted))
                raise Stall(
                    "SegmentationIdInUse",
                    f"{net.spec.type} segmentation id {wanted} is already used by "
                    f"network {_owner_of(holder)}",
                )
        held = self.ledger.held(net.uid, pool)
        if held:
            return int(held[0].spec.value)
        used = {int(v) for v in self.ledger.used(pool)}
        ranges = self._ranges(net)
        for value in candidates(ranges, used, start=self.op.shard * 7919):
            if await self.ledger.claim(pool, str(value), net):
                return value
        where = f" on {net.spec.physical_network}" if net.spec.type == "vlan" else ""
        raise Stall(
            "SegmentationIdsExhausted",
            f"no free {net.spec.type} segmentation id{where} in the configured ranges "
            f"{ranges or 'none configured'}",
        )

    # --- DHCP ----------------------------------------------------------------------

    def _dhcp_subnets(self, net: Network) -> list[Subnet]:
        return [
            s
            for s in self.op.store(Subnet).by_index("network", net.key)
            if s.spec.enable_dhcp and s.spec.ip_version == 4 and not s.deleting
        ]

    async def _dhcp(self, net: Network) -> tuple[str | None, str | None]:
        """(node, port name) of the network's DHCP server, if it needs one."""
        subnets = self._dhcp_subnets(net)
        port = self.op.store(Port).lookup(dhcp_port_name(net), net.namespace)
        if not subnets:
            if port is not None and _ours(port, net):
                await self.op.kube.delete(port)
            return None, None
        nodes = ready_nodes(self.op, net.spec.availability_zone_hints)
        current = net.status.dhcp_node
        node = current if current in nodes else rendezvous(net.uid, nodes)
        if node is None:
            return None, None
        spec = PortSpec(
            network=ProjectRef(name=net.name),
            device_owner=DHCP_OWNER,
            device_id=net.uid,
            binding=PortBinding(host=node),
            fixed_ips=[
                FixedIpRequest(subnet=s.name) for s in sorted(subnets, key=lambda s: s.name)
            ],
        )
        body = {
            "apiVersion": Port.crd.api_version,
            "kind": "Port",
            "metadata": {
                "name": dhcp_port_name(net),
                "namespace": net.namespace,
                "ownerReferences": [
                    {
                        "apiVersion": Network.crd.api_version,
                        "kind": "Network",
                        "name": net.name,
                        "uid": net.uid,
                        "controller": True,
                    }
                ],
            },
            "spec": spec.wire(),
        }
        if port is not None and not _ours(port, net):
            raise Stall(
                "DhcpPortNameTaken", f"port {port.name} exists and is not this network's DHCP port"
            )
        if port is None or port.spec.wire() != spec.wire():
            # The DHCP port is this controller's own child: it owns its spec.
            await self.op.kube.apply_raw(path_of(Port), body)
        return node, dhcp_port_name(net)

    # --- converge ---------------------------------------------------------------------

    async def converge(self, obj: Network) -> Outcome:
        segment = await self._segment(obj)
        physnet_mtu = self.config.physnet_mtus.get(obj.spec.physical_network or "")
        limit = derived_mtu(obj.spec.type, self.config.underlay_mtu, physnet_mtu)
        if obj.spec.mtu is not None and obj.spec.mtu > limit:
            raise Stall(
                "MtuTooLarge",
                f"mtu {obj.spec.mtu} exceeds {limit}, the most a {obj.spec.type} "
                f"network allows over a {physnet_mtu or self.config.underlay_mtu}-byte underlay",
            )
        mtu = obj.spec.mtu or limit
        node, dhcp_port = await self._dhcp(obj)
        ports = len(self.op.store(Port).by_index("network", obj.key))
        status = NetworkStatus(
            segmentation_id=segment, mtu=mtu, dhcp_node=node, dhcp_port=dhcp_port, ports=ports
        )
        summary = (
            f"{obj.spec.type}" + (f" {segment}" if segment is not None else "") + f", mtu {mtu}"
        )
        if node is None and self._dhcp_subnets(obj):
            return Outcome.progressing(
                "WaitingForDhcpNode",
                f"{summary}; no ready node to run DHCP on",
                status,
                requeue_after=10,
            )
        dhcp = obj.status.dhcp
        if node is not None and dhcp is not None and dhcp.node == node and not dhcp.running:
            # Reported by the DHCP node's agent, which retries on every pass.
            return Outcome.stalled(
                "DhcpFailed", f"{summary}; DHCP server on {node} failed: {dhcp.error}", status
            )
        return Outcome.ready(status, summary)

    async def finalize(self, obj: Network) -> Outcome | None:
        users = [p for p in self.op.store(Port).by_index("network", obj.key) if not _ours(p, obj)]
        if users:
            names = ", ".join(sorted(p.key for p in users)[:5])
            more = f" and {len(users) - 5} more" if len(users) > 5 else ""
            return Outcome.progressing(
                "InUse", f"waiting for {len(users)} port(s) to go: {names}{more}", requeue_after=2
            )
        dhcp = self.op.store(Port).lookup(dhcp_port_name(obj), obj.namespace)
        if dhcp is not None and _ours(dhcp, obj):
            if not dhcp.deleting:
                await self.op.kube.delete(dhcp)
            return Outcome.progressing(
                "RemovingDhcpPort", "deleting the DHCP port", requeue_after=1
            )
        await self.ledger.release_owner(obj.uid)
        return None


def _ours(port: Port, net: Network) -> bool:
    return port.spec.device_owner == DHCP_OWNER and port.spec.device_id == net.uid


def _owner_of(alloc: Any) -> str:
    if alloc is None:
        return "(unknown)"
    owner = alloc.spec.owner
    return f"{owner.namespace}/{owner.name}" if owner.namespace else owner.name


def _readiness(hv: Hypervisor | None) -> tuple[bool, bool] | None:
    if hv is None:
        return None
    return hv.status.is_true("Ready"), hv.spec.disabled
