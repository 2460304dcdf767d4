"""A router on a node, as a pure plan: (router intent, node facts) -> the
namespace, its devices and addresses, its routes, and the iptables-restore
text of its NAT and forwarding rules.

As in Neutron's L3 agent: one namespace per router (`qrouter-<uid>`); one
`qr-` device per attached subnet holding the subnet's gateway address; one
`qg-` device on the external network holding the router's gateway address
and every floating IP it serves (so the router answers ARP for them); a
default route to the external subnet's gateway. Floating IPs are DNAT in
(PREROUTING, and OUTPUT for traffic the router itself starts) and SNAT out
(POSTROUTING, before the router-wide SNAT). With SNAT on, new connections
may enter through the gateway only to a floating IP (DNAT): tenant
addresses are not routable from outside, which is what SNAT promises.
With SNAT off the router routes plainly, as Neutron does.

The rules replace the namespace's nat and filter tables as a whole through
one iptables-restore, so an update is atomic and no stale rule survives.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class RouterPort:
    """A Port of the router, as bound on this node."""

    port_uid: str
    mac: str
    address: str
    """Address with prefix length, e.g. 10.0.0.1/24."""
    mtu: int


@dataclass(frozen=True)
class FloatingMap:
    floating_ip: str
    fixed_ip: str


@dataclass(frozen=True)
class RouterIntent:
    router_uid: str
    interfaces: tuple[RouterPort, ...]
    gateway: RouterPort | None = None
    upstream: str | None = None
    """The external subnet's gateway: the router's default route."""
    enable_snat: bool = True
    routes: tuple[tuple[str, str], ...] = ()
    """Extra static routes (destination CIDR, next hop)."""
    floating: tuple[FloatingMap, ...] = ()


@dataclass(frozen=True)
class Device:
    inner: str
    """Name inside the router namespace (qr-/qg-)."""
    outer: str
    """Name of the veth end on the integration bridge."""
    port_uid: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class RouterPlan:
    netns: str
    devices: tuple[Device, ...]
    routes: tuple[tuple[str, str], ...]
    """(destination, next hop); the default route is 0.0.0.0/0."""
    iptables: str
    floating_ips: tuple[str, ...]
    """The floating addresses this plan puts in force."""


NETNS_INFIX = "-qrouter-"


def netns_name(router_uid: str, prefix: str) -> str:
    return f"{prefix}{NETNS_INFIX}{router_uid.replace('-', '')[:13]}"


def router_uid_prefix(netns: str, prefix: str) -> str | None:
    """The (shortened) router uid of one of our router namespaces."""
    head = f"{prefix}{NETNS_INFIX}"
    return netns[len(head) :] if netns.startswith(head) else None


def device_names(port_uid: str, external: bool) -> tuple[str, str]:
    """(inside, on br-int), at most 15 characters each."""
    short = port_uid.replace("-", "")
    return f"{'qg' if external else 'qr'}-{short[:11]}", f"rr{short[:12]}"


def _host(address: str) -> str:
    return str(ipaddress.ip_interface(address).ip)


def plan_router(intent: RouterIntent, prefix: str) -> RouterPlan:
    devices: list[Device] = []
    for port in sorted(intent.interfaces, key=lambda p: p.port_uid):
        inner, outer = device_names(port.port_uid, external=False)
        devices.append(Device(inner, outer, port.port_uid, port.mac, port.mtu, (port.address,)))
    routes: list[tuple[str, str]] = []
    floating = tuple(sorted(intent.floating, key=lambda f: f.floating_ip))
    gateway_device: str | None = None
    if intent.gateway is not None:
        gw = intent.gateway
        inner, outer = device_names(gw.port_uid, external=True)
        gateway_device = inner
        extra = tuple(f"{f.floating_ip}/32" for f in floating)
        devices.append(Device(inner, outer, gw.port_uid, gw.mac, gw.mtu, (gw.address, *extra)))
        if intent.upstream:
            routes.append(("0.0.0.0/0", intent.upstream))
    routes.extend(sorted(intent.routes))
    if gateway_device is None:
        floating = ()  # nothing to map through
    return RouterPlan(
        netns=netns_name(intent.router_uid, prefix),
        devices=tuple(devices),
        routes=tuple(routes),
        iptables=iptables_rules(intent, gateway_device, floating),
        floating_ips=tuple(f.floating_ip for f in floating),
    )


def iptables_rules(
    intent: RouterIntent, gateway_device: str | None, floating: tuple[FloatingMap, ...]
) -> str:
    nat = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
    ]
    filt = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
    ]
    if gateway_device is not None and intent.gateway is not None:
        for f in floating:
            nat.append(f"-A PREROUTING -d {f.floating_ip}/32 -j DNAT --to-destination {f.fixed_ip}")
            nat.append(f"-A OUTPUT -d {f.floating_ip}/32 -j DNAT --to-destination {f.fixed_ip}")
        for f in floating:
            nat.append(
                f"-A POSTROUTING -s {f.fixed_ip}/32 -o {gateway_device}"
                f" -j SNAT --to-source {f.floating_ip}"
            )
        if intent.enable_snat:
            gateway_ip = _host(intent.gateway.address)
            nat.append(f"-A POSTROUTING -o {gateway_device} -j SNAT --to-source {gateway_ip}")
            filt.append(
                f"-A FORWARD -i {gateway_device} -m conntrack --ctstate RELATED,ESTABLISHED"
                " -j ACCEPT"
            )
            filt.append(f"-A FORWARD -i {gateway_device} -m conntrack --ctstate DNAT -j ACCEPT")
            filt.append(f"-A FORWARD -i {gateway_device} -j DROP")
    return "\n".join([*nat, "COMMIT", *filt, "COMMIT", ""])
