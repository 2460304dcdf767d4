"""IPAM and segment arithmetic (pure)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nubes.controllers.allocations import allocation_name, encode_value
from nubes.controllers.ipam import IpamError, plan_subnet, random_mac
from nubes.controllers.segments import candidates, derived_mtu, segment_pool, valid_segment


def test_default_pool_skips_network_broadcast_and_gateway() -> None:
    plan = plan_subnet("10.0.0.0/29", gateway_ip=None, no_gateway=False, pools=None)
    assert str(plan.gateway) == "10.0.0.1"
    free = [str(a) for a in plan.free(set())]
    assert free == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    assert plan.capacity == 5


def test_explicit_pools_and_gateway_conflicts() -> None:
    plan = plan_subnet(
        "10.0.0.0/24", gateway_ip="10.0.0.254", no_gateway=False, pools=[("10.0.0.10", "10.0.0.12")]
    )
    assert [str(a) for a in plan.free({int(ipaddress.ip_address("10.0.0.11"))})] == [
        "10.0.0.10",
        "10.0.0.12",
    ]
    with pytest.raises(IpamError) as e:
        plan_subnet(
            "10.0.0.0/24",
            gateway_ip="10.0.0.11",
            no_gateway=False,
            pools=[("10.0.0.10", "10.0.0.12")],
        )
    assert e.value.reason == "GatewayConflictsWithAllocationPool"
    with pytest.raises(IpamError, match="reversed"):
        plan_subnet("fd00::/64", gateway_ip=None, no_gateway=False, pools=[("fd00::9", "fd00::2")])


def test_ipv6_and_tiny_subnets() -> None:
    v6 = plan_subnet("fd00::/120", gateway_ip=None, no_gateway=False, pools=None)
    assert str(v6.gateway) == "fd00::1" and str(next(v6.free(set()))) == "fd00::2"
    p2p = plan_subnet("10.0.0.0/31", gateway_ip=None, no_gateway=True, pools=None)
    assert [str(a) for a in p2p.free(set())] == ["10.0.0.0", "10.0.0.1"]
    assert not plan_subnet("10.0.0.5/32", gateway_ip=None, no_gateway=True, pools=None).pools


@given(st.integers(24, 30), st.sets(st.integers(0, 255)), st.integers(0, 1000))
def test_free_addresses_are_unused_usable_and_unique(
    prefix: int, used_offsets: set[int], start: int
) -> None:
    plan = plan_subnet(f"10.1.0.0/{prefix}", gateway_ip=None, no_gateway=False, pools=None)
    base = int(ipaddress.ip_address("10.1.0.0"))
    used = {base + o for o in used_offsets}
    free = list(plan.free(used, start=start))
    assert len(free) == len({int(a) for a in free})
    for address in free:
        assert int(address) not in used and plan.usable(address)
    assert len(free) == plan.capacity - len(
        [u for u in used if plan.in_pool(plan.address(u)) and plan.address(u) != plan.gateway]
    )


@given(st.lists(st.tuples(st.integers(1, 250), st.integers(0, 5)), min_size=1, max_size=4))
def test_index_of_inverts_the_order_of_free(ranges: list[tuple[int, int]]) -> None:
    pools: list[tuple[str, str]] = []
    for start, length in sorted(ranges):
        first, last = f"10.2.0.{start}", f"10.2.0.{min(start + length, 254)}"
        if not pools or ipaddress.ip_address(first) > ipaddress.ip_address(pools[-1][1]):
            pools.append((first, last))
    plan = plan_subnet("10.2.0.0/24", gateway_ip=None, no_gateway=True, pools=pools)
    for index, address in enumerate(plan.free(set())):
        assert plan.index_of(address) == index
        # Starting right after an address goes on with the next one.
        following = next(plan.free(set(), start=index + 1))
        assert plan.index_of(following) == (index + 1) % plan.capacity


def test_mtu_arithmetic() -> None:
    assert derived_mtu("vxlan", 1500) == 1450
    assert derived_mtu("gre", 1500) == 1458
    assert derived_mtu("vlan", 1500, physnet_mtu=9000) == 9000
    assert derived_mtu("flat", 1500) == 1500
    assert derived_mtu("vxlan", 9000) == 8950


def test_segments() -> None:
    assert segment_pool("vlan", "physnet1") == "segment.vlan.physnet1"
    assert segment_pool("local", None) is None
    assert valid_segment("vlan", 4094) and not valid_segment("vlan", 4095)
    assert valid_segment("vxlan", 16_777_215) and not valid_segment("vxlan", 16_777_216)
    assert list(candidates([(1, 5)], {1, 2}, start=3)) == [4, 5, 3]


def test_allocation_names_are_dns_safe() -> None:
    assert allocation_name("ip.abc", "10.0.0.5") == "ip.abc.10-0-0-5"
    assert encode_value("fd00::1") == "fd00-0000-0000-0000-0000-0000-0000-0001"
    assert encode_value("FA:16:3E:00:00:01") == "fa-16-3e-00-00-01"
    mac = random_mac()
    assert mac.startswith("fa:16:3e:") and len(mac) == 17
