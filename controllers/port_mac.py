"""Ports' MAC addresses, unique in their network.

A port with an IPv4 address gets the MAC derived from it (`derived_mac`):
the address's claim in the ledger already makes that MAC unique in the
network (a network's subnets do not overlap), so it needs no claim of its
own, and a port costs one API write less. A port that gives that address up
keeps its MAC and keeps holding the address as well (off its status), so
that no other port can derive the same MAC; only when the address's subnet
goes away is the MAC claimed instead.

Every other MAC is claimed in the network's MAC pool like any value of the
ledger: one given in the spec (never in the derived range, which admission
refuses) and a random one for a port without IPv4.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from nubes.api.network import Allocation, FixedIp, Network, Port, Subnet
from nubes.controllers.allocations import Ledger
from nubes.controllers.ipam import derived_from, derived_mac, random_mac
from nubes.controllers.subnet import ip_pool
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Stall, Wait

MAC_ATTEMPTS = 16


def mac_pool(network: Network) -> str:
    return f"mac.{network.uid}"


def holder_of(alloc: Allocation | None) -> str:
    if alloc is None:
        return "another port"
    owner = alloc.spec.owner
    return f"port {owner.namespace}/{owner.name}"


class MacPicker:
    def __init__(self, op: Operator, ledger: Ledger):
        self.op, self.ledger = op, ledger

    async def mac(
        self, port: Port, net: Network, fixed: list[FixedIp], subnets: list[Subnet]
    ) -> str:
        """The port's MAC on `net`, given the addresses it now holds (their
        claims made, the ones it gave up not yet released) and the network's
        live subnets."""
        pool = mac_pool(net)
        derivable = [m for f in fixed if (m := derived_mac(f.ip_address))]
        given = port.spec.mac_address
        if given:
            wanted = given.lower()
            if await self._claim(port, pool, wanted):
                return wanted
            raise Stall(
                "MacAddressInUse",
                f"MAC {wanted} is already used on network {net.name} by "
                f"{holder_of(self.ledger.holder(pool, wanted))}",
            )
        held = [a.spec.value for a in self.ledger.held(port.uid, pool)]
        kept = port.status.mac_address or (held[0] if held else None)
        if kept and kept in derivable:
            await self._release_except(port, pool, set())
            return kept
        address = derived_from(kept) if kept else None
        if kept and address is not None:
            # A derived MAC whose address the port gave up: the address is
            # its guard (a claim it already holds costs no write; one another
            # writer released is taken again if free); claimed only where no
            # live subnet can give that address; else it is another port's
            # now, and this one gets a new MAC.
            home = [s for s in subnets if ip_address(address) in ip_network(s.spec.cidr)]
            if home and await self.ledger.claim(ip_pool(home[0]), address, port):
                await self._release_except(port, pool, set())
                return kept
            if not home and await self._claim(port, pool, kept):
                return kept
        elif kept and await self._claim(port, pool, kept):
            return kept
        # A claim on a derived MAC is left only by a port whose address's
        # subnet went away: a subnet made there since cannot give it again.
        claimed = self.ledger.holder(pool, derivable[0]) if derivable else None
        if derivable and (claimed is None or claimed.spec.owner.uid == port.uid):
            await self._release_except(port, pool, set())
            return derivable[0]
        for _ in range(MAC_ATTEMPTS):
            if await self._claim(port, pool, mac := random_mac()):
                return mac
        raise Wait("MacAllocationContended", "could not find a free MAC; retrying", 1)

    def guard(self, port: Port, mac: str | None, pools: set[str]) -> Allocation | None:
        """The port's claim on the address its MAC was derived from, in one
        of `pools`, if it holds one."""
        address = derived_from(mac) if mac else None
        if address is None:
            return None
        for alloc in self.ledger.held(port.uid, "ip."):
            if alloc.spec.value == address and alloc.spec.pool in pools:
                return alloc
        return None

    async def _claim(self, port: Port, pool: str, mac: str) -> bool:
        if not await self.ledger.claim(pool, mac, port):
            return False
        await self._release_except(port, pool, {mac})
        return True

    async def _release_except(self, port: Port, pool: str, keep: set[str]) -> None:
        for alloc in self.ledger.held(port.uid, pool):
            if alloc.spec.value not in keep:
                await self.ledger.release(alloc)
