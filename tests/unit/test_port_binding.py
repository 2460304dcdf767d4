"""Port binding on a node: a VIF sits in the dead VLAN until its Port is
bound there, and a guest starts only on ports that are bound and carry their
network (pure decisions; tests/drivers/test_vif_isolation.py checks them on a real switch)."""

from __future__ import annotations

from typing import Any

from nubes.agent.binding import unbound_ports, vif_vlan, vif_vlans
from nubes.api.network import Port
from nubes.drivers.network.ovs import OvsPort
from nubes.drivers.network.switch import (
    DEAD_VLAN,
    carries,
    integration_flows,
    is_isolated,
)

NODE = "node-a"
NET = "net-uid-1"
VLANS = {NET: 3}


def port(
    uid: str = "p1",
    *,
    host: str | None = NODE,
    admin_up: bool = True,
    deleting: bool = False,
    binding: dict[str, Any] | None = None,
    network_uid: str = NET,
) -> Port:
    meta: dict[str, Any] = {"name": f"port-{uid}", "namespace": "proj", "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "macAddress": "fa:16:3e:00:00:01",
        "networkUid": network_uid,
        "host": host,
    }
    if binding is not None:
        status["binding"] = binding
    return Port.model_validate(
        {
            "metadata": meta,
            "spec": {"network": {"name": "blue"}, "adminStateUp": admin_up},
            "status": status,
        }
    )


def ovs_port(
    tag: int | None, vlan_mode: str | None = None, trunks: tuple[int, ...] = ()
) -> OvsPort:
    return OvsPort("qvo1", 5, tag, "", vlan_mode=vlan_mode, trunks=trunks)


DEAD = ovs_port(DEAD_VLAN, "trunk", (DEAD_VLAN,))
BOUND = {"node": NODE, "device": "qvo1", "localVlan": 3, "active": True}


# --- which tag a plugged VIF gets ---------------------------------------------------


def test_a_port_bound_here_gets_its_networks_local_vlan() -> None:
    assert vif_vlan(port(), NODE, VLANS) == 3


def test_everything_else_stays_in_the_dead_vlan() -> None:
    assert vif_vlan(None, NODE, VLANS) == DEAD_VLAN, "unknown port"
    assert vif_vlan(port(host=None), NODE, VLANS) == DEAD_VLAN, "bound nowhere"
    assert vif_vlan(port(host="node-b"), NODE, VLANS) == DEAD_VLAN, "bound elsewhere"
    assert vif_vlan(port(admin_up=False), NODE, VLANS) == DEAD_VLAN, "disabled"
    assert vif_vlan(port(deleting=True), NODE, VLANS) == DEAD_VLAN, "being deleted"
    assert vif_vlan(port(network_uid="other"), NODE, VLANS) == DEAD_VLAN, "network not here"
    assert vif_vlan(port(), NODE, {NET: DEAD_VLAN}) == DEAD_VLAN
    assert vif_vlan(port(), NODE, {NET: 0}) == DEAD_VLAN, "0 would be untagged"


def test_every_plugged_vif_gets_a_decision() -> None:
    ports = {"p1": port("p1"), "p2": port("p2", host="node-b")}
    assert vif_vlans(["p1", "p2", "stray"], ports, NODE, VLANS) == {
        "p1": 3,
        "p2": DEAD_VLAN,
        "stray": DEAD_VLAN,
    }


# --- whether a guest may start on its ports -----------------------------------------


def test_a_bound_port_carrying_its_vlan_lets_the_guest_start() -> None:
    assert unbound_ports([("a", port(binding=BOUND))], NODE, {"p1": ovs_port(3)}) == []
    assert unbound_ports([("a", port(binding=BOUND))], NODE, {"p1": ovs_port(3, "access")}) == []


def test_the_guest_waits_for_every_unbound_port_and_says_why() -> None:
    cases = [
        ((None, {}), "port a is being deleted"),
        ((port(deleting=True, binding=BOUND), {"p1": ovs_port(3)}), "being deleted"),
        ((port(host="node-b", binding=BOUND), {"p1": ovs_port(3)}), "bound to node node-b"),
        ((port(host=None), {"p1": DEAD}), "bound to no node"),
        ((port(binding=BOUND), {}), "not plugged on node-a"),
        ((port(), {"p1": DEAD}), "not bound on node-a yet"),
        ((port(binding={**BOUND, "active": False}), {"p1": ovs_port(3)}), "not bound"),
        ((port(binding={**BOUND, "node": "node-b"}), {"p1": ovs_port(3)}), "not bound"),
        # Status says bound, the switch does not (yet, or any more): no start.
        ((port(binding=BOUND), {"p1": DEAD}), "does not carry its network"),
        ((port(binding=BOUND), {"p1": ovs_port(None)}), "does not carry"),
        ((port(binding=BOUND), {"p1": ovs_port(4)}), "does not carry"),
        ((port(binding=BOUND), {"p1": ovs_port(3, "trunk", (3,))}), "does not carry"),
        ((port(binding={**BOUND, "localVlan": None}), {"p1": ovs_port(None)}), "does not carry"),
    ]
    for (p, vifs), why in cases:
        problems = unbound_ports([("a", p)], NODE, vifs)
        assert len(problems) == 1 and why in str(problems[0]), (p, vifs, problems)
        assert str(problems[0]).startswith("port a "), "the message names the port"


def test_a_disabled_port_lets_the_guest_start_only_isolated() -> None:
    off = port(admin_up=False)
    assert unbound_ports([("a", off)], NODE, {"p1": DEAD}) == []
    assert unbound_ports([("a", off)], NODE, {"p1": ovs_port(3)})
    assert unbound_ports([("a", off)], NODE, {"p1": ovs_port(None)})


def test_one_unbound_port_of_several_holds_the_guest() -> None:
    ok, bad = port("p1", binding=BOUND), port("p2", host="node-b")
    problems = unbound_ports([("a", ok), ("b", bad)], NODE, {"p1": ovs_port(3), "p2": DEAD})
    assert [p.port for p in problems] == ["b"]


# --- the switch side ------------------------------------------------------------------


def test_isolated_means_dead_tag_in_trunk_mode_carrying_only_the_dead_vlan() -> None:
    assert is_isolated(DEAD)
    assert not is_isolated(ovs_port(DEAD_VLAN)), "an access port of 4095 talks to the others"
    assert not is_isolated(ovs_port(None)), "untagged is a trunk of every VLAN"
    assert carries(ovs_port(3), 3) and not carries(DEAD, DEAD_VLAN)


def test_br_int_drops_the_dead_vlan_before_anything_else() -> None:
    flows = integration_flows([], {}, {})
    assert flows[0] == f"table=0,priority=65535,dl_vlan={DEAD_VLAN},actions=drop"
