"""Ports' MACs: derived from an IPv4 address without a claim of their own,
claimed otherwise, and a derived one kept after its address changed stays
guarded by that address until its subnet goes. The API here is a dict of
Allocations (names are the uniqueness, as on the API server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nubes.api.network import Allocation, FixedIp, Network, Port, Subnet
from nubes.controllers.allocations import Ledger
from nubes.controllers.ipam import derived_from, derived_mac
from nubes.controllers.port_mac import MacPicker, mac_pool
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Stall

NET = Network.model_validate({"metadata": {"name": "net", "namespace": "ns", "uid": "u-net"}})
POOL = mac_pool(NET)


def subnet(uid: str) -> Subnet:
    return Subnet.model_validate(
        {
            "metadata": {"name": uid, "namespace": "ns", "uid": uid},
            "spec": {"network": {"name": "net"}, "cidr": "10.0.0.0/24"},
        }
    )


S1, S2 = subnet("s1"), subnet("s2")


class Allocations:
    """Creates and reads of Allocations by name; a taken name is a 409."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    async def create(self, obj: Allocation) -> dict[str, Any]:
        body = obj.wire()
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiError(409, {"reason": "AlreadyExists", "message": name})
        body["metadata"]["uid"] = f"uid-{name}"
        self.objects[name] = body
        return body

    async def get(self, _kind: Any, name: str) -> Allocation | None:
        found = self.objects.get(name)
        return Allocation.model_validate(found) if found else None

    async def delete_raw(self, _path: str, name: str, uid: str | None = None) -> None:
        self.objects.pop(name, None)


def picker() -> tuple[MacPicker, Allocations]:
    api = Allocations()
    op = Operator("controller", api)  # type: ignore[arg-type]
    return MacPicker(op, Ledger(op)), api


def port(name: str, mac: str | None = None, kept: str | None = None) -> Port:
    return Port.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}"},
            "spec": {"network": {"name": "net"}, "macAddress": mac},
            "status": {"macAddress": kept},
        }
    )


def ips(*addresses: str) -> list[FixedIp]:
    return [FixedIp(subnet="s", ip_address=a) for a in addresses]


def test_derived_macs_stand_for_ipv4_addresses() -> None:
    assert derived_mac("10.0.0.5") == "0a:4e:0a:00:00:05"
    assert derived_mac("192.168.255.1") == "0a:4e:c0:a8:ff:01"
    assert derived_mac("fd00::5") is None
    assert derived_from("0A:4E:0A:00:00:05") == "10.0.0.5"
    assert derived_from("fa:16:3e:00:00:05") is None
    assert derived_from("0a:4e:zz:00:00:05") is None and derived_from("0a:4e:0a") is None


def test_a_port_with_ipv4_gets_the_derived_mac_without_a_claim() -> None:
    macs, api = picker()
    mac = asyncio.run(macs.mac(port("a"), NET, ips("fd00::7", "10.0.0.5"), []))
    assert mac == "0a:4e:0a:00:00:05"
    assert api.objects == {}


def test_other_macs_are_claimed() -> None:
    macs, api = picker()
    random = asyncio.run(macs.mac(port("a"), NET, ips("fd00::7"), []))
    assert random.startswith("fa:16:3e:")
    assert list(api.objects) == [f"{POOL}.{random.replace(':', '-')}"]
    given = asyncio.run(macs.mac(port("b", mac="FA:16:3E:00:00:01"), NET, ips("10.0.0.6"), []))
    assert given == "fa:16:3e:00:00:01" and len(api.objects) == 2
    with pytest.raises(Stall) as refused:
        asyncio.run(macs.mac(port("c", mac="fa:16:3e:00:00:01"), NET, ips("10.0.0.7"), []))
    assert refused.value.reason == "MacAddressInUse" and "ns/b" in str(refused.value)


def test_a_port_keeps_the_address_its_mac_stands_for_until_its_subnet_goes() -> None:
    macs, api = picker()
    moved = port("a", kept="0a:4e:0a:00:00:05")
    guard = "ip.s1.10-0-0-5"
    assert asyncio.run(macs.ledger.claim("ip.s1", "10.0.0.5", moved))
    # Port a moved from 10.0.0.5 to 10.0.0.9: the MAC stays, guarded by
    # the claim on 10.0.0.5 (which nobody else can take), with no claim of its own.
    assert asyncio.run(macs.mac(moved, NET, ips("10.0.0.9"), [S1])) == "0a:4e:0a:00:00:05"
    assert macs.guard(moved, "0a:4e:0a:00:00:05", {"ip.s1"}) is not None
    assert list(api.objects) == [guard]
    # Its subnet going away (not among the live pools), the MAC is claimed.
    assert asyncio.run(macs.mac(moved, NET, ips("10.0.0.9"), [])) == "0a:4e:0a:00:00:05"
    assert f"{POOL}.0a-4e-0a-00-00-05" in api.objects
    # A port getting 10.0.0.5 from a subnet made since derives nothing taken.
    other = asyncio.run(macs.mac(port("b"), NET, ips("10.0.0.5"), [S2]))
    assert other.startswith("fa:16:3e:")
    # Port a getting its first address back drops the claim.
    assert asyncio.run(macs.mac(moved, NET, ips("10.0.0.5"), [])) == "0a:4e:0a:00:00:05"
    assert f"{POOL}.0a-4e-0a-00-00-05" not in api.objects


def test_a_writer_that_finds_the_guard_released_takes_it_again_or_gives_up_the_mac() -> None:
    macs, api = picker()
    moved = port("a", kept="0a:4e:0a:00:00:05")
    # Another writer released 10.0.0.5: free, so it is held again as the guard.
    assert asyncio.run(macs.mac(moved, NET, ips("10.0.0.9"), [S1])) == "0a:4e:0a:00:00:05"
    assert list(api.objects) == ["ip.s1.10-0-0-5"]
    # Held by another port (which derives that MAC): this one gets a new MAC.
    other = port("c", kept="0a:4e:0a:00:00:06")
    assert asyncio.run(macs.ledger.claim("ip.s1", "10.0.0.6", port("d")))
    mac = asyncio.run(macs.mac(other, NET, ips("10.0.0.7"), [S1]))
    assert mac == "0a:4e:0a:00:00:07"
