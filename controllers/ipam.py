"""IP address management (pure): pools, gateways, free addresses, MACs."""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Container, Iterator
from dataclasses import dataclass

from nubes.drivers.problem import Failure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Neutron's default base MAC; the last three octets are random.
MAC_PREFIX = "fa:16:3e"
# MACs derived from a port's IPv4 address: this prefix (locally
# administered, unicast) and the address's four octets. Unique in a network
# for as long as the address is, which its claim already guarantees.
DERIVED_MAC_PREFIX = "0a:4e"


class IpamError(Failure):
    """A subnet's addresses cannot be planned: waits for a new spec."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason=reason, retryable=False)


@dataclass(frozen=True)
class SubnetPlan:
    """The addresses a subnet hands out."""

    network: IPNetwork
    gateway: IPAddress | None
    pools: tuple[tuple[int, int], ...]
    """Inclusive integer ranges."""

    @property
    def capacity(self) -> int:
        return sum(last - first + 1 for first, last in self.pools) - sum(
            1 for g in [self.gateway] if g is not None and self.in_pool(g)
        )

    def address(self, value: int) -> IPAddress:
        if self.network.version == 4:
            return ipaddress.IPv4Address(value)
        return ipaddress.IPv6Address(value)

    def in_pool(self, address: IPAddress) -> bool:
        value = int(address)
        return any(first <= value <= last for first, last in self.pools)

    def usable(self, address: IPAddress) -> bool:
        """Assignable to a port: in the CIDR and not network, broadcast or gateway."""
        if address not in self.network or address == self.gateway:
            return False
        if self.network.version == 4:
            if self.network.prefixlen >= 31:
                return True
            return address not in (self.network.network_address, self.network.broadcast_address)
        return address != self.network.network_address  # IPv6 subnet-router anycast

    def free(self, used: Container[int], *, start: int = 0) -> Iterator[IPAddress]:
        """Free pool addresses in order, beginning `start` addresses in (and
        wrapping around), so that concurrent workers start apart and a worker
        can go on after its last pick (`index_of`)."""
        total = sum(last - first + 1 for first, last in self.pools)
        if total == 0:
            return
        gateway = int(self.gateway) if self.gateway is not None else None
        offset = start % total
        for index in range(total):
            value = _nth(self.pools, (offset + index) % total)
            if value not in used and value != gateway:
                yield self.address(value)

    def index_of(self, address: IPAddress) -> int:
        """Position of a pool address among the pool addresses (for `start`)."""
        value, before = int(address), 0
        for first, last in self.pools:
            if first <= value <= last:
                return before + value - first
            before += last - first + 1
        raise ValueError(f"{address} is in no pool")


def _nth(pools: tuple[tuple[int, int], ...], n: int) -> int:
    for first, last in pools:
        size = last - first + 1
        if n < size:
            return first + n
        n -= size
    raise IndexError(n)


def plan_subnet(
    cidr: str,
    *,
    gateway_ip: str | None,
    no_gateway: bool,
    pools: list[tuple[str, str]] | None,
) -> SubnetPlan:
    """Effective gateway and pools, validated (what CEL cannot check)."""
    network = ipaddress.ip_network(cidr, strict=True)
    if no_gateway:
        gateway: IPAddress | None = None
    elif gateway_ip:
        gateway = ipaddress.ip_address(gateway_ip)
    else:
        gateway = _first_host(network)
    if pools:
        ranges = []
        for start_text, end_text in pools:
            start, end = ipaddress.ip_address(start_text), ipaddress.ip_address(end_text)
            if start.version != network.version or start not in network or end not in network:
                raise IpamError(
                    "InvalidAllocationPool",
                    f"allocation pool {start}-{end} is not inside {network}",
                )
            if int(start) > int(end):
                raise IpamError(
                    "InvalidAllocationPool",
                    f"allocation pool is reversed: start {start} is after end {end}",
                )
            ranges.append((int(start), int(end)))
        ranges.sort()
        for (_, last), (first, _) in itertools.pairwise(ranges):
            if first <= last:
                raise IpamError("InvalidAllocationPool", "allocation pools overlap")
        plan = SubnetPlan(network, gateway, tuple(ranges))
        if gateway is not None and plan.in_pool(gateway):
            raise IpamError(
                "GatewayConflictsWithAllocationPool",
                f"gateway {gateway} lies inside an allocation pool",
            )
        return plan
    low, high = _first_host(network), _last_host(network)
    if low is None or high is None:
        return SubnetPlan(network, gateway, ())
    return SubnetPlan(network, gateway, ((int(low), int(high)),))


def _first_host(network: IPNetwork) -> IPAddress | None:
    if network.num_addresses == 1:
        return None
    if network.version == 4 and network.prefixlen >= 31:
        return network.network_address
    return network.network_address + 1


def _last_host(network: IPNetwork) -> IPAddress | None:
    if network.num_addresses == 1:
        return None
    if network.version == 4 and network.prefixlen < 31:
        return network.broadcast_address - 1
    return network.broadcast_address


def random_mac(rng: random.Random | None = None) -> str:
    r = rng or random
    return f"{MAC_PREFIX}:{r.randrange(256):02x}:{r.randrange(256):02x}:{r.randrange(256):02x}"


def derived_mac(address: str) -> str | None:
    """The MAC derived from an IPv4 address; None for IPv6."""
    ip = ipaddress.ip_address(address)
    if ip.version != 4:
        return None
    return ":".join([DERIVED_MAC_PREFIX, *(f"{octet:02x}" for octet in ip.packed)])


def derived_from(mac: str) -> str | None:
    """The IPv4 address a MAC of the derived range stands for; None for
    MACs outside it."""
    parts = mac.lower().split(":")
    if ":".join(parts[:2]) != DERIVED_MAC_PREFIX or len(parts) != 6:
        return None
    try:
        return str(ipaddress.IPv4Address(bytes(int(o, 16) for o in parts[2:])))
    except ValueError:  # not hex octets: not a MAC this range ever gave
        return None


def overlaps(a: str, b: str) -> bool:
    na, nb = ipaddress.ip_network(a), ipaddress.ip_network(b)
    return na.version == nb.version and na.overlaps(nb)  # type: ignore[arg-type,unused-ignore]
