"""The node's routers (Neutron's L3 agent), for nodes started with --l3.

Level-based like the networking loop: every pass builds each hosted router's
intent from the controller's resolved status (the Router's `interfaces` and
`gatewayPort`, the bound Ports' MACs and MTUs, the FloatingIPs the controller
assigned to the router), plans it (drivers/network/l3_plan.py, pure), applies
the plan, removes every router namespace and br-int port no plan wants, and
reports per router in the Router's `status.l3`, which only the agent of the
router's node writes. One router failing is reported on that router; the
others still converge.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from nubes.agent.config import AgentConfig
from nubes.agent.network import NodeNetworking
from nubes.api.network import FloatingIP, Port, Router, RouterL3Status, RouterPortStatus
from nubes.drivers.network.l3_plan import (
    FloatingMap,
    RouterIntent,
    RouterPlan,
    RouterPort,
    plan_router,
)
from nubes.drivers.network.ovs import Ovs, OvsEndpoint
from nubes.drivers.network.router import RouterError, Routers
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.status_apply import apply_status

log = structlog.get_logger()


@dataclass
class Applied:
    errors: dict[str, str] = field(default_factory=dict)
    """Router key -> why it could not be set up."""


class NodeRouters:
    def __init__(self, config: AgentConfig, networking: NodeNetworking):
        self.config = config
        self.networking = networking
        runner = SubprocessRunner()
        # Its own OVSDB client: the L3 loop runs in its own worker thread,
        # next to the networking loop's, and a client is not shared across
        # threads.
        switch = NodeSwitch(
            Ovs(runner, OvsEndpoint(config.ovs_db, config.ovs_rundir, config.node_netns)),
            datapath_type=networking.switch.datapath_type,
            integration_bridge=config.integration_bridge,
        )
        self.routers = Routers(
            runner,
            switch,
            netns_prefix=config.netns_prefix,
            node_netns=config.node_netns,
        )

    def register(self, op: Operator) -> None:
        self.op = op
        op.store(FloatingIP).add_index(
            "l3-agent-router",
            lambda f: [f"{f.namespace}/{f.status.router}"] if f.status.router else [],
        )
        op.loop("l3", self.sync, [Router, FloatingIP, Port])

    # --- intent ----------------------------------------------------------------------

    def _port(self, ref: RouterPortStatus) -> RouterPort | None:
        port: Port | None = self.op.store(Port).lookup(ref.name, ref.namespace)
        if (
            port is None
            or port.deleting
            or port.status.host != self.config.node
            or not port.status.mac_address
        ):
            return None
        return RouterPort(
            port.uid, port.status.mac_address, ref.ip_address, port.status.mtu or 1500
        )

    def intents(self) -> dict[str, tuple[Router, RouterIntent]]:
        result = {}
        for router in self.op.store(Router):
            if router.deleting or router.status.node != self.config.node:
                continue
            interfaces = tuple(
                p for p in (self._port(i) for i in router.status.interfaces) if p is not None
            )
            gateway = router.status.gateway_port
            gw = self._port(gateway) if gateway is not None else None
            floating = tuple(
                FloatingMap(f.status.floating_ip_address, f.status.fixed_ip_address)
                for f in self.op.store(FloatingIP).by_index("l3-agent-router", router.key)
                if not f.deleting
                and f.spec.port
                and f.status.node == self.config.node
                and f.status.floating_ip_address
                and f.status.fixed_ip_address
            )
            result[router.key] = (
                router,
                RouterIntent(
                    router_uid=router.uid,
                    interfaces=interfaces,
                    gateway=gw,
                    upstream=gateway.gateway_ip if gateway is not None else None,
                    enable_snat=bool(router.status.enable_snat),
                    routes=tuple((r.destination, r.nexthop) for r in router.status.routes),
                    floating=floating,
                ),
            )
        return result

    # --- apply (in a worker thread) -----------------------------------------------------

    def apply(self, plans: dict[str, RouterPlan], full: bool) -> Applied:
        applied = Applied()
        for key, plan in plans.items():
            try:
                self.routers.ensure(plan, full)
            except RouterError as e:
                applied.errors[key] = str(e)
                log.warning("router failed", router=key, error=str(e))
        wanted_ns = {p.netns for p in plans.values()}
        for namespace in self.routers.namespaces():
            if namespace not in wanted_ns:
                try:
                    self.routers.remove(namespace)
                except Exception as e:
                    log.warning("router removal failed", netns=namespace, error=str(e))
        self.routers.prune_ports({d.outer for p in plans.values() for d in p.devices})
        return applied

    # --- report ------------------------------------------------------------------------

    async def sync(self, full: bool) -> None:
        intents = self.intents()
        plans = {
            key: plan_router(intent, self.config.netns_prefix)
            for key, (_, intent) in intents.items()
        }
        applied = await asyncio.to_thread(self.apply, plans, full)
        log.debug("l3 pass", routers=len(plans), errors=len(applied.errors), full=full)
        # New router devices were plugged isolated: bind them now rather than
        # at the networking loop's next event.
        self.networking.kick()
        for key, (router, _) in intents.items():
            error = applied.errors.get(key)
            entry: dict[str, Any] = {
                "node": self.config.node,
                "ready": error is None,
                "error": error or "",
                "floatingIps": [] if error else sorted(plans[key].floating_ips),
            }
            if router.status.l3 != RouterL3Status.model_validate(entry):
                await self._report(router, entry)

    async def _report(self, router: Router, entry: dict[str, Any]) -> None:
        try:
            await apply_status(self.op.kube, router, {"l3": entry})
        except ApiError as e:
            if not e.conflict:
                raise
            # Decided from an outdated view: the next pass has the newer one.
