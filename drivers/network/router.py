"""Router namespaces on a node: applies a RouterPlan (l3_plan.py).

Netlink (namespaces, veth pairs, MTU, MAC, addresses, routes) goes through
pyroute2. Three things do not, because they are not netlink: checksum
offload (an ethtool ioctl; the userspace datapath needs it off, see
host-facts), `net.ipv4.ip_forward` (a /proc/sys file only writable from
inside the namespace) and the NAT rules (iptables-restore reads the planner's
text and swaps the tables atomically); these go through the injected runner.
The br-int side goes through NodeSwitch like every other VIF, plugged
isolated: the node's networking loop gives it its network's local VLAN once
the Port is bound here.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from collections.abc import Iterator

import structlog
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nubes.drivers.network.l3_plan import NETNS_INFIX, Device, RouterPlan
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.runner import CommandError, Runner

log = structlog.get_logger()

OUTER_PREFIX = "rr"
NETNS_DIR = "/run/netns"


class RouterError(Exception):
    """A router could not be set up on this node."""


@contextlib.contextmanager
def _ipr(namespace: str | None) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=namespace) if namespace else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _links(ipr: IPRoute) -> dict[str, int]:
    return {str(link.get("ifname")): int(link["index"]) for link in ipr.get_links()}


class Routers:
    """The router namespaces of one node."""

    def __init__(
        self, runner: Runner, switch: NodeSwitch, *, netns_prefix: str, node_netns: str | None
    ):
        self.run = runner
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

    def ensure(self, plan: RouterPlan, full: bool = False) -> None:
        try:
            self._ensure(plan, full)
        except (NetlinkError, CommandError, OSError) as e:
            raise RouterError(f"{type(e).__name__}: {e}") from e

    def _ensure(self, plan: RouterPlan, full: bool) -> None:
        fresh = not os.path.exists(os.path.join(NETNS_DIR, plan.netns))
        if fresh:
            netns.create(plan.netns)
        with _ipr(plan.netns) as ipr:
            lo = _index(ipr, "lo")
            if lo is not None:
                ipr.link("set", index=lo, state="up")
        if fresh or full:
            self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=plan.netns)
        plugged = {p.name for p in self.switch.vif_ports().values()}
        for device in plan.devices:
            self._device(plan.netns, device, plugged)
        wanted = {d.inner for d in plan.devices}
        with _ipr(plan.netns) as ipr:
            for name, index in _links(ipr).items():
                if name.startswith(("qr-", "qg-")) and name not in wanted:
                    ipr.link("del", index=index)
            self._routes(ipr, plan)
        if full or self._rules.get(plan.netns) != plan.iptables:
            self.run(["iptables-restore"], input=plan.iptables, netns=plan.netns)
            self._rules[plan.netns] = plan.iptables
        log.debug("router converged", netns=plan.netns, devices=len(plan.devices))

    def _device(self, namespace: str, device: Device, plugged: set[str]) -> None:
        with _ipr(namespace) as inner_ipr:
            index = _index(inner_ipr, device.inner)
        if index is None:
            with _ipr(self.node_netns) as outer_ipr:
                stale = _index(outer_ipr, device.outer)
                if stale is not None:  # half-built by an interrupted pass
                    outer_ipr.link("del", index=stale)
                outer_ipr.link(
                    "add",
                    ifname=device.outer,
                    kind="veth",
                    peer={"ifname": device.inner, "net_ns_fd": namespace},
                )
                outer = _index(outer_ipr, device.outer)
                assert outer is not None
                outer_ipr.link("set", index=outer, mtu=device.mtu, state="up")
            self._offload_off(device.outer, self.node_netns)
            self._offload_off(device.inner, namespace)
        with _ipr(namespace) as ipr:
            index = _index(ipr, device.inner)
            assert index is not None
            link = ipr.get_links(index)[0]
            if link.get("address") != device.mac.lower() or link.get("mtu") != device.mtu:
                ipr.link("set", index=index, state="down")
                ipr.link("set", index=index, address=device.mac.lower(), mtu=device.mtu)
            ipr.link("set", index=index, state="up")
            self._addresses(ipr, index, device.addresses)
        if device.outer not in plugged:
            self.switch.add_vif(device.outer, device.port_uid, device.mac)

    def _offload_off(self, name: str, namespace: str | None) -> None:
        self.run(["ethtool", "-K", name, "tx", "off"], netns=namespace, check=False)

    @staticmethod
    def _addresses(ipr: IPRoute, index: int, wanted: tuple[str, ...]) -> None:
        present = {
            f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=index, family=2)
        }
        for cidr in wanted:
            if cidr not in present:
                iface = ipaddress.ip_interface(cidr)
                ipr.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
        for cidr in present - set(wanted):
            iface = ipaddress.ip_interface(cidr)
            ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    @staticmethod
    def _routes(ipr: IPRoute, plan: RouterPlan) -> None:
        present: dict[str, str] = {}
        for route in ipr.get_routes(family=2, table=254):
            gateway = route.get("gateway")
            if gateway:
                dst = route.get("dst") or "0.0.0.0"
                present[f"{dst}/{route['dst_len']}"] = str(gateway)
        wanted = dict(plan.routes)
        for dst, via in wanted.items():
            if present.get(dst) != via:
                try:
                    ipr.route("replace", dst=dst, gateway=via)
                except NetlinkError as e:
                    # A next hop not on any subnet of the router (yet): the
                    # route waits for the interface; the rest still applies.
                    if e.code != errno.ENETUNREACH:
                        raise
                    log.warning("route not applied", dst=dst, via=via, error=str(e))
        for dst in set(present) - set(wanted):
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=dst, gateway=present[dst])

    def remove(self, namespace: str) -> None:
        """Every trace of a router: its br-int ports, veth pairs and namespace
        (which takes its addresses, routes and iptables rules with it)."""
        if os.path.exists(os.path.join(NETNS_DIR, namespace)):
            with _ipr(namespace) as ipr:
                for name, index in _links(ipr).items():
                    if name.startswith(("qr-", "qg-")):
                        ipr.link("del", index=index)
            netns.remove(namespace)
        self._rules.pop(namespace, None)
        log.info("router removed", netns=namespace)

    def prune_ports(self, wanted: set[str]) -> None:
        """br-int ports of router devices no plan wants (routers removed,
        interfaces detached, or gone with a namespace)."""
        for port in list(self.switch.vif_ports().values()):
            if port.name.startswith(OUTER_PREFIX) and port.name not in wanted:
                self.switch.remove_vif(port.name)
                with _ipr(self.node_netns) as ipr:
                    index = _index(ipr, port.name)
                    if index is not None:
                        ipr.link("del", index=index)
