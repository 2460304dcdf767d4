"""The node's networking, converged as a whole: switch layout and tunnels,
port bindings (VLAN tags on br-int), and the DHCP servers this node runs.

Like Neutron's OVS and DHCP agents, but level-based: every pass computes the
desired node state from the watch caches and applies it through the drivers;
what the agent observes goes into the Ports' `binding` and `dhcp` status
fields, which only this node's agent writes.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from nubes.agent.binding import vif_vlans
from nubes.agent.config import AgentConfig
from nubes.agent.firewall import FirewallIntent, NodeFirewall
from nubes.api.compute import Hypervisor
from nubes.api.network import Network, Port, Subnet
from nubes.drivers.network.dhcp import DhcpConfig, DhcpHost, DhcpServers, DhcpSubnet
from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import DatapathType, Ovs, OvsEndpoint, kernel_datapath_available
from nubes.drivers.network.switch import DEAD_VLAN, NetworkSegment, NodeSwitch
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.status_apply import apply_status

log = structlog.get_logger()

PATCH_CONCURRENCY = 16


@dataclass
class Plan:
    """The desired node state, computed from the caches (pure)."""

    segments: list[NetworkSegment] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    bound: dict[str, Port] = field(default_factory=dict)
    """Ports bound to this node, by uid."""
    dhcp: list[tuple[DhcpConfig, list[Port]]] = field(default_factory=list)
    """DHCP servers to run, with the ports each serves."""
    dhcp_networks: dict[str, Network] = field(default_factory=dict)
    """Networks whose DHCP server this node runs, by uid."""
    firewall: FirewallIntent = field(default_factory=FirewallIntent)
    """Security groups and port security of the bound ports."""


@dataclass
class Applied:
    vlans: dict[str, int]
    plugged: dict[str, str]
    """Port uid -> OVS port name, for bound ports found on br-int."""
    dhcp_errors: dict[str, str] = field(default_factory=dict)
    """Network uid -> why its DHCP server could not be set up."""


def hostname_for(ip: str) -> str:
    return "host-" + ip.replace(".", "-").replace(":", "-")


class NodeNetworking:
    def __init__(self, config: AgentConfig):
        self.config = config
        runner = SubprocessRunner()
        endpoint = OvsEndpoint(config.ovs_db, config.ovs_rundir, config.node_netns)
        # The kernel datapath only where its module exists (and for the host's
        # own switch); the userspace datapath everywhere else.
        datapath: DatapathType = (
            "system" if kernel_datapath_available() and not config.node_netns else "netdev"
        )
        self.switch = NodeSwitch(
            Ovs(runner, endpoint),
            datapath_type=datapath,
            integration_bridge=config.integration_bridge,
            tunnel_bridge=config.tunnel_bridge,
            tunnel_ip=config.tunnel_ip,
            bridge_mappings=config.bridge_mappings,
        )
        self.links = Links(runner)
        self.dhcp = DhcpServers(
            runner,
            self.links,
            self.switch,
            state_dir=config.state_dir,
            netns_prefix=config.netns_prefix,
            node_netns=config.node_netns,
        )
        self.firewall = NodeFirewall(config, runner)
        self._last_layout: tuple[Any, ...] | None = None
        self.kick: Callable[[], None] = lambda: None
        log.info("node networking", datapath=datapath, node=config.node)

    def register(self, op: Operator) -> None:
        self.op = op
        ports = op.store(Port)
        ports.add_index("network-uid", lambda p: [p.status.network_uid or ""])
        # A VIF plugged by the compute agent changes no watched object: it
        # kicks the loop so that the VIF is bound without waiting for a resync.
        self.kick = op.loop("networking", self.sync, [Network, Subnet, Port, Hypervisor])
        self.firewall.register(op)

    # --- plan ---------------------------------------------------------------------------

    def plan(self) -> Plan:
        me = self.config.node
        networks = {n.uid: n for n in self.op.store(Network) if not n.deleting}
        plan = Plan()
        plan.bound = {
            p.uid: p
            for p in self.op.store(Port)
            if p.status.host == me and p.status.network_uid in networks and p.status.mac_address
        }
        here = {p.status.network_uid for p in plan.bound.values()}
        for net in networks.values():
            if net.status.dhcp_node == me and net.status.dhcp_port:
                config = self._dhcp_config(net)
                if config is not None:
                    plan.dhcp.append(config)
                    plan.dhcp_networks[net.uid] = net
                    here.add(net.uid)
        for uid in sorted(u for u in here if u):
            net = networks[uid]
            if net.spec.type in ("vlan", "vxlan", "gre") and net.status.segmentation_id is None:
                continue  # not allocated yet
            plan.segments.append(
                NetworkSegment(
                    uid, net.spec.type, net.status.segmentation_id, net.spec.physical_network
                )
            )
        plan.firewall = self.firewall.intent(plan.bound)
        plan.peers = sorted(
            hv.status.host_ip
            for hv in self.op.store(Hypervisor)
            if hv.name != me and hv.status.host_ip and not hv.deleting
        )
        return plan

    def _dhcp_config(self, net: Network) -> tuple[DhcpConfig, list[Port]] | None:
        port = self.op.store(Port).lookup(net.status.dhcp_port or "", net.namespace)
        if port is None or not port.status.mac_address or not port.status.fixed_ips:
            return None
        subnets = {
            s.name: s
            for s in self.op.store(Subnet)
            if s.namespace == net.namespace
            and s.spec.network.name == net.name
            and s.spec.enable_dhcp
            and s.spec.ip_version == 4
            and s.status.is_true("Ready")
        }
        addresses = []
        for fixed in port.status.fixed_ips:
            subnet = subnets.get(fixed.subnet)
            if subnet is not None:
                prefix = ipaddress.ip_network(subnet.spec.cidr).prefixlen
                addresses.append(f"{fixed.ip_address}/{prefix}")
        if not addresses:
            return None
        hosts: list[DhcpHost] = []
        served: list[Port] = []
        for other in self.op.store(Port).by_index("network-uid", net.uid):
            if other.uid == port.uid or not other.status.mac_address or other.deleting:
                continue
            ips = [f.ip_address for f in other.status.fixed_ips if f.subnet in subnets]
            for ip in ips:
                hosts.append(DhcpHost(other.status.mac_address, ip, hostname_for(ip)))
            if ips:
                served.append(other)
        config = DhcpConfig(
            network_uid=net.uid,
            port_uid=port.uid,
            mac=port.status.mac_address,
            addresses=tuple(addresses),
            local_vlan=0,  # filled in once the switch has placed the network
            mtu=net.status.mtu or 1500,
            subnets=tuple(
                DhcpSubnet(
                    s.spec.cidr,
                    s.status.gateway_ip,
                    tuple(s.spec.dns_nameservers),
                    tuple((r.destination, r.nexthop) for r in s.spec.host_routes),
                )
                for s in sorted(subnets.values(), key=lambda s: s.name)
            ),
            hosts=tuple(hosts),
        )
        return config, served

    # --- apply (drivers, in a worker thread) ----------------------------------------------

    def apply(self, plan: Plan, full: bool) -> Applied:
        layout = (tuple(plan.segments), tuple(plan.peers))
        if full or layout != self._last_layout:
            self.switch.ensure_base()
            vlans = self.switch.converge(plan.segments, plan.peers)
            self._last_layout = layout
        else:
            vlans = self.switch.local_vlans()
        vifs = self.switch.vif_ports()
        plugged: dict[str, str] = {}
        # Unknown, unbound, disabled or deleted: isolated (dead VLAN).
        wanted = vif_vlans(list(vifs), plan.bound, self.config.node, vlans)
        # A filtered port carries its network only once its rules are in
        # force; a firewall failure leaves the previous rules in force.
        try:
            in_force = self.firewall.converge(plan.firewall, vifs, verify=full)
        except Exception as e:
            log.warning("firewall failed", error=str(e) or type(e).__name__)
            in_force = self.firewall.in_force
        for uid in {p.uid for p in plan.firewall.ports} - in_force:
            if uid in wanted:
                wanted[uid] = DEAD_VLAN
        for uid, ovs_port in vifs.items():
            self.switch.bind(ovs_port, wanted[uid])
            if wanted[uid] != DEAD_VLAN:
                plugged[uid] = ovs_port.name
        served = set()
        errors: dict[str, str] = {}
        for config, _ in plan.dhcp:
            vlan = vlans.get(config.network_uid)
            if vlan is None:
                continue
            served.add(config.network_uid)
            # One network's DHCP server failing (a setting dnsmasq refuses, a
            # host condition) is reported on that network; the others are
            # still served.
            try:
                self.dhcp.ensure(DhcpConfig(**{**config.__dict__, "local_vlan": vlan}))
            except Exception as e:
                errors[config.network_uid] = str(e) or type(e).__name__
                log.warning(
                    "dhcp failed", network=config.network_uid, error=errors[config.network_uid]
                )
        for stale in self.dhcp.networks() - served:
            try:
                self.dhcp.remove(stale)
            except Exception as e:
                log.warning("dhcp removal failed", network=stale, error=str(e))
        return Applied(vlans, plugged, errors)

    # --- report ---------------------------------------------------------------------------

    async def sync(self, full: bool) -> None:
        plan = self.plan()
        applied = await asyncio.to_thread(self.apply, plan, full)
        # One write per port: its binding and its DHCP entry together (a
        # second write from the same cached version would be refused).
        patches: dict[str, tuple[Port, dict[str, Any]]] = {}

        def report(port: Port, fields: dict[str, Any]) -> None:
            patches.setdefault(port.uid, (port, {}))[1].update(fields)

        for uid, port in plan.bound.items():
            vlan = applied.vlans.get(port.status.network_uid or "")
            device = applied.plugged.get(uid)
            binding = {
                "node": self.config.node,
                "device": device or "",
                "localVlan": vlan,
                "active": device is not None,
            }
            current = port.status.binding.wire() if port.status.binding else None
            if current != {k: v for k, v in binding.items() if v is not None}:
                report(port, {"binding": binding})
        for config, served in plan.dhcp:
            if config.network_uid not in applied.vlans:
                continue
            await self._report_dhcp(
                plan.dhcp_networks[config.network_uid], applied.dhcp_errors.get(config.network_uid)
            )
            if config.network_uid in applied.dhcp_errors:
                continue  # its ports are not served
            ips_by_mac: dict[str, list[str]] = {}
            for host in config.hosts:
                ips_by_mac.setdefault(host.mac, []).append(host.ip)
            for port in served:
                entry = {
                    "node": self.config.node,
                    "macAddress": port.status.mac_address,
                    "ipAddresses": sorted(ips_by_mac.get(port.status.mac_address or "", [])),
                }
                current = port.status.dhcp.wire() if port.status.dhcp else None
                if current != entry:
                    report(port, {"dhcp": entry})
        await self._patch(list(patches.values()))

    async def _report_dhcp(self, net: Network, error: str | None) -> None:
        """The DHCP server's state on the Network (the controller turns a
        failure into its Stalled condition)."""
        entry = {"node": self.config.node, "running": error is None, "error": error or ""}
        current = net.status.dhcp.model_dump(mode="json") if net.status.dhcp else None
        if current == entry:
            return
        await self._apply(net, {"dhcp": entry})

    async def _apply(self, obj: Port | Network, status: dict[str, Any]) -> None:
        try:
            await apply_status(self.op.kube, obj, status)
        except ApiError as e:
            if not e.conflict:
                raise
            # Decided from an outdated view: the newer one is in the cache
            # soon and brings the next pass.

    async def _patch(self, patches: list[tuple[Port, dict[str, Any]]]) -> None:
        semaphore = asyncio.Semaphore(PATCH_CONCURRENCY)

        async def one(port: Port, status: dict[str, Any]) -> None:
            async with semaphore:
                await self._apply(port, status)

        await asyncio.gather(*(one(p, s) for p, s in patches))
