"""Router intent -> plan (namespace, devices, routes, iptables-restore text),
against golden files in tests/unit/golden/ (NUBES_UPDATE_GOLDEN=1 rewrites
them; review the diff)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nubes.drivers.network.l3_plan import (
    FloatingMap,
    RouterIntent,
    RouterPort,
    device_names,
    netns_name,
    plan_router,
    router_uid_prefix,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("NUBES_UPDATE_GOLDEN") == "1"

UID = "0b5a3c6e-1111-4222-8333-944455556666"
IF1 = RouterPort("aaaaaaaa-0000-0000-0000-000000000001", "fa:16:3e:00:00:01", "10.0.0.1/24", 1450)
IF2 = RouterPort("bbbbbbbb-0000-0000-0000-000000000002", "fa:16:3e:00:00:02", "10.1.0.1/24", 1450)
GW = RouterPort(
    "cccccccc-0000-0000-0000-000000000003", "fa:16:3e:00:00:03", "203.0.113.10/24", 1500
)

FULL = RouterIntent(
    router_uid=UID,
    interfaces=(IF2, IF1),
    gateway=GW,
    upstream="203.0.113.1",
    enable_snat=True,
    routes=(("192.168.50.0/24", "10.0.0.254"),),
    floating=(
        FloatingMap("203.0.113.21", "10.0.0.5"),
        FloatingMap("203.0.113.20", "10.1.0.7"),
    ),
)
NO_SNAT = RouterIntent(UID, (IF1,), GW, "203.0.113.1", enable_snat=False)
INTERNAL = RouterIntent(UID, (IF1, IF2), floating=(FloatingMap("203.0.113.20", "10.0.0.5"),))

CASES = {"snat-fip": FULL, "no-snat": NO_SNAT, "internal-only": INTERNAL}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with NUBES_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"plan drifted from {path}; regenerate and review"


def render(intent: RouterIntent) -> str:
    plan = plan_router(intent, "nubes")
    lines = [f"netns {plan.netns}"]
    for d in plan.devices:
        lines.append(f"device {d.inner} {d.outer} {d.mac} mtu {d.mtu} {' '.join(d.addresses)}")
    for dst, via in plan.routes:
        lines.append(f"route {dst} via {via}")
    lines.append(f"floating {' '.join(plan.floating_ips) or '-'}")
    return "\n".join(lines) + "\n--- iptables-restore\n" + plan.iptables


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_plan_matches_golden(case: str) -> None:
    check_golden(f"router-{case}.txt", render(CASES[case]))


def test_floating_ips_are_served_only_through_a_gateway() -> None:
    plan = plan_router(INTERNAL, "nubes")
    assert plan.floating_ips == ()
    assert "DNAT" not in plan.iptables and "SNAT" not in plan.iptables


def test_snat_off_routes_plainly_but_keeps_floating_ips() -> None:
    fip = FloatingMap("203.0.113.9", "10.0.0.5")
    intent = RouterIntent(UID, (IF1,), GW, None, False, floating=(fip,))
    plan = plan_router(intent, "p")
    assert "--to-source 203.0.113.10" not in plan.iptables
    assert "-j DROP" not in plan.iptables
    assert "--to-destination 10.0.0.5" in plan.iptables
    assert "203.0.113.9/32" in plan.devices[-1].addresses
    assert plan.routes == ()


def test_floating_snat_comes_before_the_router_snat() -> None:
    rules = plan_router(FULL, "nubes").iptables.splitlines()
    fip = rules.index(
        "-A POSTROUTING -s 10.0.0.5/32 -o qg-cccccccc000 -j SNAT --to-source 203.0.113.21"
    )
    router = rules.index("-A POSTROUTING -o qg-cccccccc000 -j SNAT --to-source 203.0.113.10")
    assert fip < router


def test_names_fit_linux_limits_and_map_back() -> None:
    for uid in (UID, "x" * 36):
        ns = netns_name(uid, "nbt12345n1")
        assert router_uid_prefix(ns, "nbt12345n1") == uid.replace("-", "")[:13]
        for external in (True, False):
            inner, outer = device_names(uid, external)
            assert len(inner) <= 15 and len(outer) <= 15
    assert router_uid_prefix("nubes-dhcp-abc", "nubes") is None
