"""Segmentation ids and MTU arithmetic for network types (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

# Bytes each overlay adds around a guest frame, over an IPv4 underlay:
#   vxlan: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 = 50 (1500 -> 1450)
#   gre:   outer IPv4 20 + GRE 4 + GRE key 4 + inner Ethernet 14 = 42 (1500 -> 1458)
# The seed notes give 1462 for GRE, counting a 4-byte GRE header; our tunnels
# (like Neutron's) carry the network in the 4-byte GRE key, so 4 more bytes go.
OVERHEAD = {"vxlan": 50, "gre": 42}
VLAN_IDS = range(1, 4095)
VNI_MAX = 16_777_215
GRE_KEY_MAX = 4_294_967_295


def derived_mtu(network_type: str, underlay_mtu: int, physnet_mtu: int | None = None) -> int:
    """The largest guest MTU the network type allows."""
    if network_type in OVERHEAD:
        return underlay_mtu - OVERHEAD[network_type]
    if network_type in ("flat", "vlan"):
        return physnet_mtu or underlay_mtu
    return underlay_mtu  # local: no underlay involved


def segment_pool(network_type: str, physical_network: str | None) -> str | None:
    """Name of the pool whose values must be unique; None when the type has none."""
    if network_type in ("vxlan", "gre"):
        return f"segment.{network_type}"
    if network_type == "vlan":
        return f"segment.vlan.{physical_network}"
    if network_type == "flat":
        return f"segment.flat.{physical_network}"
    return None


def valid_segment(network_type: str, value: int) -> bool:
    if network_type == "vlan":
        return value in VLAN_IDS
    if network_type == "vxlan":
        return 1 <= value <= VNI_MAX
    if network_type == "gre":
        return 1 <= value <= GRE_KEY_MAX
    return False


def candidates(ranges: Iterable[tuple[int, int]], used: set[int], start: int = 0) -> Iterator[int]:
    """Free values of the ranges, in order, beginning at the `start`-th value
    (so that concurrent workers do not all race for the same first one)."""
    values = [v for first, last in ranges for v in range(first, last + 1)]
    if not values:
        return
    offset = start % len(values)
    for v in values[offset:] + values[:offset]:
        if v not in used:
            yield v
