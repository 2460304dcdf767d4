"""Router namespaces on a node: applies a RouterPlan (l3_plan.py).

Namespaces, veth pairs, addresses and routes go through iproute2 (the Links
helper, as the DHCP namespaces do), not pyroute2: pyroute2 0.9's netns
support forks helper processes, and the first try here took the whole agent
process down when called from the agent's worker thread; until that is
understood, the proven path is used. Checksum offload (ethtool; the userspace
datapath needs it off, see host-facts), `net.ipv4.ip_forward` and the NAT
rules (iptables-restore reads the planner's text and swaps the tables
atomically) go through the same injected runner. The br-int side goes
through NodeSwitch like every other VIF, plugged isolated: the node's
networking loop gives it its network's local VLAN once the Port is bound
here.
"""

from __future__ import annotations

import json
import os

import structlog

from nubes.drivers.network.l3_plan import NETNS_INFIX, Device, RouterPlan
from nubes.drivers.network.netns import Links, one_socket_per_namespace
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.runner import CommandError, Runner

log = structlog.get_logger()

OUTER_PREFIX = "rr"
NETNS_DIR = "/run/netns"


def ip_argv(namespace: str | None, *args: str) -> list[str]:
    return ["ip", *(["-n", namespace] if namespace else []), *args]


class RouterError(Exception):
    """A router could not be set up on this node."""


class Routers:
    """The router namespaces of one node."""

    def __init__(
        self, runner: Runner, switch: NodeSwitch, *, netns_prefix: str, node_netns: str | None
    ):
        self.run = runner
        self.links = Links(runner)
        self.switch = switch
        self.prefix = netns_prefix
        self.node_netns = node_netns
        self._rules: dict[str, str] = {}
        """iptables text last applied, by namespace (re-applied on full passes)."""

    # --- namespaces -------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        head = f"{self.prefix}{NETNS_INFIX}"
        try:
            return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(head))
        except FileNotFoundError:
            return []

    @one_socket_per_namespace
    def ensure(self, plan: RouterPlan, full: bool = False) -> None:
        try:
            self._ensure(plan, full)
        except (CommandError, OSError) as e:
            raise RouterError(f"{type(e).__name__}: {e}") from e

    def _ensure(self, plan: RouterPlan, full: bool) -> None:
        fresh = not self.links.netns_exists(plan.netns)
        if fresh:
            self.links.ensure_netns(plan.netns)
        if fresh or full:
            self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=plan.netns)
        plugged = {p.name for p in self.switch.vif_ports().values()}
        present = self._links(plan.netns)
        for device in plan.devices:
            self._device(plan.netns, device, plugged, present)
        wanted = {d.inner for d in plan.devices}
        for name in present:
            if name.startswith(("qr-", "qg-")) and name not in wanted:
                self.links.delete(name, plan.netns)
        self._routes(plan)
        if full or self._rules.get(plan.netns) != plan.iptables:
            self.run(["iptables-restore"], input=plan.iptables, netns=plan.netns)
            self._rules[plan.netns] = plan.iptables
        log.debug("router converged", netns=plan.netns, devices=len(plan.devices))

    def _links(self, namespace: str | None) -> dict[str, dict[str, object]]:
        out = self.run(ip_argv(namespace, "-j", "link", "show")).stdout
        return {str(link["ifname"]): link for link in json.loads(out or "[]")}

    def _device(
        self,
        namespace: str,
        device: Device,
        plugged: set[str],
        present: dict[str, dict[str, object]],
    ) -> None:
        link = present.get(device.inner)
        if link is None:
            # Half-built by an interrupted pass: start over.
            self.links.delete(device.outer, self.node_netns)
            self.links.ensure_veth(
                device.inner,
                namespace,
                device.outer,
                self.node_netns,
                mtu=device.mtu,
                mac=device.mac.lower(),
            )
        elif link.get("address") != device.mac.lower() or link.get("mtu") != device.mtu:
            self.run(ip_argv(namespace, "link", "set", "dev", device.inner, "down"))
            self.run(
                ip_argv(
                    namespace,
                    "link",
                    "set",
                    "dev",
                    device.inner,
                    "address",
                    device.mac.lower(),
                    "mtu",
                    str(device.mtu),
                    "up",
                )
            )
        self.links.replace_addresses(device.inner, namespace, list(device.addresses))
        if device.outer not in plugged:
            self.switch.add_vif(device.outer, device.port_uid, device.mac)

    def _routes(self, plan: RouterPlan) -> None:
        out = self.run(ip_argv(plan.netns, "-j", "-4", "route", "show", "table", "main")).stdout
        present: dict[str, str] = {}
        for route in json.loads(out or "[]"):
            if "gateway" in route:
                dst = "0.0.0.0/0" if route["dst"] == "default" else str(route["dst"])
                if "/" not in dst:
                    dst += "/32"
                present[dst] = str(route["gateway"])
        wanted = dict(plan.routes)
        for dst, via in wanted.items():
            if present.get(dst) != via:
                result = self.run(
                    ip_argv(plan.netns, "route", "replace", dst, "via", via), check=False
                )
                if result.returncode != 0:
                    # A next hop on no subnet of the router (yet): the route
                    # waits for that interface; the rest still applies.
                    log.warning("route not applied", dst=dst, via=via, error=result.stderr.strip())
        for dst in set(present) - set(wanted):
            self.run(ip_argv(plan.netns, "route", "del", dst, "via", present[dst]), check=False)

    def remove(self, namespace: str) -> None:
        """Every trace of a router: its br-int ports, veth pairs and namespace
        (which takes its addresses, routes and iptables rules with it)."""
        if self.links.netns_exists(namespace):
            for name in self._links(namespace):
                if name.startswith(("qr-", "qg-")):
                    self.links.delete(name, namespace)
            self.links.delete_netns(namespace)
        self._rules.pop(namespace, None)
        log.info("router removed", netns=namespace)

    def prune_ports(self, wanted: set[str]) -> None:
        """br-int ports of router devices no plan wants (routers removed,
        interfaces detached, or gone with a namespace)."""
        for port in list(self.switch.vif_ports().values()):
            if port.name.startswith(OUTER_PREFIX) and port.name not in wanted:
                self.switch.remove_vif(port.name)
                self.links.delete(port.name, self.node_netns)
