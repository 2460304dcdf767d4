"""Security group decisions of the controller and the agent, without an API:
ports' effective groups, members, the rule quota's order, and what a port's
firewall input is made of."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nubes.agent.firewall import device_of, filtered, port_intent
from nubes.api.network import Network, Port, SecurityGroup, SecurityGroupStatus
from nubes.controllers.port import PortSecurity, security_of
from nubes.controllers.security_group import (
    Pacer,
    SecurityGroupReconciler,
    default_group,
    ensure_default_group,
    members_of,
    rules_before,
)
from nubes.drivers.network.firewall_rules import FwRule
from nubes.drivers.network.ovs import OvsPort
from nubes.runtime.operator import Operator


def port(
    spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, **meta: Any
) -> Port:
    return Port.model_validate(
        {
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-p", **meta},
            "spec": {"network": {"name": "net"}, **(spec or {})},
            "status": status or {},
        }
    )


def network(security: bool = True) -> Network:
    return Network.model_validate(
        {"metadata": {"name": "net", "namespace": "ns"}, "spec": {"portSecurityEnabled": security}}
    )


def group(
    name: str, rules: int | list[dict[str, Any]], created: str = "", **status: Any
) -> SecurityGroup:
    body = rules if isinstance(rules, list) else [{"direction": "egress"}] * rules
    return SecurityGroup.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": f"u-{name}",
                "creationTimestamp": created or None,
            },
            "spec": {"rules": body},
            "status": status,
        }
    )


def test_port_uses_its_groups_or_default() -> None:
    assert security_of(port(), network()) == PortSecurity(True, ["default"])
    listed = port({"securityGroups": ["web", "db", "web"]})
    assert security_of(listed, network()).groups == ["db", "web"]
    assert security_of(port({"securityGroups": []}), network()).groups == []


def test_port_security_off_means_no_groups() -> None:
    assert security_of(port(), network(security=False)) == PortSecurity(False, [])
    on_port = port({"portSecurityEnabled": True})
    assert security_of(on_port, network(security=False)).enabled is True
    dhcp = port({"deviceOwner": "network:dhcp"})
    assert security_of(dhcp, network()) == PortSecurity(False, [])


def test_another_projects_port_is_never_infrastructure() -> None:
    """Infrastructure ports live in their network's namespace: a port of
    another namespace claiming network:* stays filtered."""
    foreign = port({"deviceOwner": "network:dhcp"}, namespace="tenant-b")
    assert security_of(foreign, network()) == PortSecurity(True, ["default"])


def test_default_group_is_neutrons() -> None:
    body = default_group("ns")
    rules = body["spec"]["rules"]
    assert {(r["direction"], r["ethertype"], r.get("remoteGroup")) for r in rules} == {
        ("egress", "IPv4", None),
        ("egress", "IPv6", None),
        ("ingress", "IPv4", "default"),
        ("ingress", "IPv6", "default"),
    }
    SecurityGroup.model_validate(body)


def test_members_are_fixed_addresses_of_live_ports() -> None:
    live = port(status={"fixedIps": [{"subnet": "s", "ipAddress": "10.0.0.5"}]})
    going = port(
        status={"fixedIps": [{"subnet": "s", "ipAddress": "10.0.0.6"}]},
        deletionTimestamp="2026-01-01T00:00:00Z",
    )
    assert members_of([live, going, live]) == ["10.0.0.5"]


def test_pacer_allows_one_change_per_interval() -> None:
    now = [100.0]
    pacer = Pacer(0.5, clock=lambda: now[0])
    assert pacer.wait("ns/g") == 0.0
    now[0] += 0.2
    assert pacer.wait("ns/g") == pytest.approx(0.3) and pacer.wait("ns/other") == 0.0
    now[0] += 0.3
    assert pacer.wait("ns/g") == 0.0
    pacer.forget("ns/g")
    assert pacer.wait("ns/g") == 0.0


def test_growing_membership_is_paced_and_shrinking_goes_out_at_once() -> None:
    now = [100.0]
    reconciler = SecurityGroupReconciler()
    reconciler.pace = Pacer(0.5, clock=lambda: now[0])
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "1 rule, 1 port",
        "observedGeneration": 1,
    }
    g = group("g", 1, ports=1, members=["10.0.0.5"], conditions=[ready])
    g.metadata.generation = 1
    grown = SecurityGroupStatus(ports=2, members=["10.0.0.5", "10.0.0.6"])
    assert reconciler._held_back(g, grown) is None  # the first change goes out
    now[0] += 0.1
    held = reconciler._held_back(g, grown)
    assert held is not None and held.requeue_after == pytest.approx(0.4)
    assert held.status == {"ports": 1, "members": ["10.0.0.5"]}
    assert held.message == "1 rule, 1 port"
    shrunk = SecurityGroupStatus(ports=0, members=[])
    assert reconciler._held_back(g, shrunk) is None
    g.metadata.generation = 2  # rules changed: the verdict is not held back
    assert reconciler._held_back(g, grown) is None


def test_rule_quota_refuses_the_newest_and_refused_groups_hold_nothing() -> None:
    old = group("a", 4, "2026-01-01T00:00:00Z")
    big = group("b", 3, "2026-01-01T00:00:01Z")
    small = group("c", 2, "2026-01-01T00:00:02Z")
    groups = [small, big, old]
    assert rules_before(old, groups, 6) == 0
    assert rules_before(big, groups, 6) == 4  # 4 + 3 > 6: refused
    assert rules_before(small, groups, 6) == 4  # big holds nothing: 4 + 2 fits
    assert rules_before(small, groups, 10) == 7


def test_port_intent_fails_closed_on_missing_or_stalled_groups() -> None:
    p = port(
        {
            "securityGroups": ["web", "gone", "bad"],
            "allowedAddressPairs": [{"ipAddress": "10.0.0.9"}],
        },
        {
            "macAddress": "FA:16:3E:00:00:01",
            "fixedIps": [{"subnet": "s", "ipAddress": "10.0.0.5"}],
            "securityGroups": ["web", "gone", "bad"],
        },
    )
    stalled = {"conditions": [{"type": "Stalled", "status": "True", "reason": "QuotaExceeded"}]}
    groups = {
        "web": group(
            "web",
            [
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "portRangeMax": 22},
                {"direction": "ingress", "ethertype": "IPv6", "remoteGroup": "web"},
                {"direction": "ingress", "remoteGroup": "gone"},
            ],
        ),
        "bad": group("bad", 1, **stalled),
    }
    fw = port_intent(p, groups)
    assert fw.mac == "fa:16:3e:00:00:01" and fw.ips == ("10.0.0.5",)
    assert fw.pairs == (("10.0.0.9", ""),)
    assert fw.rules == (
        FwRule("ingress", 4, "tcp", 22, 22),
        FwRule("ingress", 6, remote_group="u-web"),
    )


def test_unresolved_port_security_is_filtered_and_devices_come_from_qvo() -> None:
    assert filtered(port())
    assert not filtered(port(status={"portSecurityEnabled": False}))
    assert device_of(OvsPort("qvoabc", 1, None, "")) == "tapabc"
    assert device_of(OvsPort("dh-xyz", 1, None, "")) is None


class CountingKube:
    """The two calls ensure_default_group makes, slow enough to overlap."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def get_raw(self, *_args: Any) -> None:
        await asyncio.sleep(0.01)
        return None

    async def create_raw(self, _kind: Any, body: dict[str, Any], namespace: str) -> None:
        await asyncio.sleep(0.01)
        self.created.append(f"{namespace}/{body['metadata']['name']}")


def test_concurrent_first_ports_of_a_namespace_make_one_default_group() -> None:
    kube = CountingKube()
    op = Operator("controller", kube)  # type: ignore[arg-type]

    async def burst() -> None:
        await asyncio.gather(*(ensure_default_group(op, ns) for ns in ["a"] * 16 + ["b"] * 3))

    asyncio.run(burst())
    assert sorted(kube.created) == ["a/default", "b/default"]


class RefusingKube(CountingKube):
    async def create_raw(self, _kind: Any, body: dict[str, Any], namespace: str) -> None:
        await asyncio.sleep(0.01)
        self.created.append(f"tried {namespace}")
        raise RuntimeError("API server down")


def test_a_failed_create_reaches_every_waiter_and_the_next_call_tries_again() -> None:
    kube = RefusingKube()
    op = Operator("controller", kube)  # type: ignore[arg-type]
    unhandled: list[dict[str, Any]] = []

    async def scenario() -> list[Any]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        # A waiter cancelled alone (its worker stopping) leaves nobody to read the error.
        lone = asyncio.ensure_future(ensure_default_group(op, "c"))
        await asyncio.sleep(0)
        lone.cancel()
        await asyncio.sleep(0.05)
        results = await asyncio.gather(
            *(ensure_default_group(op, "a") for _ in range(3)), return_exceptions=True
        )
        results.append(await asyncio.gather(ensure_default_group(op, "a"), return_exceptions=True))
        return results

    results = asyncio.run(scenario())
    assert [type(r).__name__ for r in results[:3]] == ["RuntimeError"] * 3
    assert type(results[3][0]).__name__ == "RuntimeError"
    assert kube.created == ["tried c", "tried a", "tried a"]
    assert unhandled == []
