"""Security group planner -> iptables/ebtables/ipset text, against golden
files in tests/unit/golden/, plus the driver's transactions through a
recording runner.

    NUBES_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/drivers/test_firewall_rules.py
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nubes.drivers.network.firewall import Firewall, parse_save
from nubes.drivers.network.firewall_rules import (
    FirewallPlan,
    FwPort,
    FwRule,
    Names,
    eui64_link_local,
    ipset_text,
    plan_firewall,
    restore_text,
)
from nubes.drivers.runner import Result

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = os.environ.get("NUBES_UPDATE_GOLDEN") == "1"
TAG = "0a1b2c3d"
GROUP = "5e0c1f6a-aaaa-bbbb-cccc-000000000001"

WEB = FwPort(
    uid="9f8e7d6c-5b4a-4321-8765-0123456789ab",
    device="tap9f8e7d6c5b4",
    mac="fa:16:3e:00:00:01",
    ips=("10.0.0.5", "fd00::5"),
    pairs=(("10.0.0.64/28", "fa:16:3e:00:00:99"), ("10.0.0.9", "")),
    rules=(
        FwRule("egress", 4),
        FwRule("egress", 6),
        FwRule("ingress", 4, remote_group=GROUP),
        FwRule("ingress", 6, remote_group=GROUP),
        FwRule("ingress", 4, "icmp", remote_cidr="192.168.0.0/16"),
        FwRule("ingress", 4, "tcp", 22, 22, remote_cidr="192.168.0.0/16"),
        FwRule("ingress", 4, "udp", 5000, 5100),
        FwRule("ingress", 4, "icmp", icmp_type=8, icmp_code=0),
        FwRule("ingress", 6, "icmp", icmp_type=128),
        FwRule("ingress", 4, "112"),
        FwRule("ingress", 4, "tcp", 22, 22, remote_cidr="192.168.0.0/16"),  # duplicate
    ),
)
CLOSED = FwPort(
    uid="00000000-1111-2222-3333-444444444444",
    device="tap0000000011",
    mac="fa:16:3e:00:00:02",
    ips=("10.0.0.6",),
)
MEMBERS = {GROUP: ("10.0.0.6", "10.0.0.5", "fd00::6", "10.0.0.6")}


def render(plan: FirewallPlan) -> str:
    return "\n".join(
        [
            "# iptables-restore --noflush",
            restore_text(plan.ipv4),
            "# ip6tables-restore --noflush",
            restore_text(plan.ipv6),
            "# ebtables-restore --noflush",
            restore_text(plan.ebtables, ebtables=True),
            "# ipset restore",
            ipset_text(plan.ipsets, Names(TAG)),
        ]
    )


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with NUBES_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"{name} differs from the golden file; if intended, regenerate with"
        " NUBES_UPDATE_GOLDEN=1 and review the diff"
    )


def test_two_ports_match_golden() -> None:
    check_golden("firewall-two-ports.txt", render(plan_firewall([WEB, CLOSED], MEMBERS, TAG)))


def test_plan_is_deterministic_in_port_order() -> None:
    assert plan_firewall([CLOSED, WEB], MEMBERS, TAG) == plan_firewall([WEB, CLOSED], MEMBERS, TAG)


def test_no_ports_no_chains() -> None:
    plan = plan_firewall([], MEMBERS, TAG)
    assert plan == FirewallPlan()


def test_names_fit_kernel_limits() -> None:
    names = Names("ffffffff")
    uid = "ffffffff-ffff-ffff-ffff-ffffffffffff"
    for kind in "iosa":
        assert len(names.port_chain(kind, uid)) <= 28
    name = names.ipset(6, uid)
    assert len(name) <= 31 and len(names.temp_ipset(name)) <= 31


def test_every_chain_drops_what_is_not_allowed() -> None:
    plan = plan_firewall([WEB], MEMBERS, TAG)
    for table in (plan.ipv4, plan.ipv6, plan.ebtables):
        for chain, lines in table.items():
            if chain.endswith(("fwd", "in")):
                continue
            assert lines[-1] == "-j DROP", chain


def test_spoof_chain_allows_own_addresses_and_pairs_only() -> None:
    plan = plan_firewall([WEB], MEMBERS, TAG)
    spoof = plan.ipv4[Names(TAG).port_chain("s", WEB.uid)]
    assert spoof == [
        "-s 10.0.0.5/32 -m mac --mac-source fa:16:3e:00:00:01 -j RETURN",
        "-s 10.0.0.64/28 -m mac --mac-source fa:16:3e:00:00:99 -j RETURN",
        "-s 10.0.0.9/32 -m mac --mac-source fa:16:3e:00:00:01 -j RETURN",
        "-j DROP",
    ]
    spoof6 = plan.ipv6[Names(TAG).port_chain("s", WEB.uid)]
    assert f"-s {eui64_link_local(WEB.mac)}/128 -m mac --mac-source {WEB.mac} -j RETURN" in spoof6


def test_eui64() -> None:
    assert eui64_link_local("fa:16:3e:00:00:01") == "fe80::f816:3eff:fe00:1"


def test_dhcp_server_and_router_advertisements_dropped_after_spoof_check() -> None:
    names = Names(TAG)
    egress4 = plan_firewall([CLOSED], {}, TAG).ipv4[names.port_chain("o", CLOSED.uid)]
    spoof = egress4.index(f"-j {names.port_chain('s', CLOSED.uid)}")
    dhcp = egress4.index("-p udp -m udp --sport 67 --dport 68 -j DROP")
    established = egress4.index("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    assert spoof < dhcp < established
    egress6 = plan_firewall([CLOSED], {}, TAG).ipv6[names.port_chain("o", CLOSED.uid)]
    ra = egress6.index("-p ipv6-icmp -m icmp6 --icmpv6-type 134 -j DROP")
    assert ra < egress6.index("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")


def test_ipset_swapped_in_under_a_temporary_name() -> None:
    names = Names(TAG)
    text = ipset_text({names.ipset(4, GROUP): (4, ("10.0.0.5/32",))}, names)
    lines = text.splitlines()
    assert lines[-2].startswith("swap ") and lines[-1].startswith("destroy ")
    assert not any(
        line.startswith(("flush nb-0a1b2c3d-4", "destroy nb-0a1b2c3d-4")) for line in lines
    )


SAVE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:nb-0a1b2c3d-fwd - [0:0]
:nb-0a1b2c3d-iold - [0:0]
:nb-ffffffff-fwd - [0:0]
-A FORWARD -j nb-ffffffff-fwd
-A FORWARD -j nb-0a1b2c3d-fwd
-A nb-0a1b2c3d-fwd -j nb-0a1b2c3d-iold
COMMIT
"""


def test_parse_save_sees_only_own_chains() -> None:
    chains, hooked = parse_save(SAVE, "nb-0a1b2c3d-")
    assert chains == {"nb-0a1b2c3d-fwd", "nb-0a1b2c3d-iold"}
    assert hooked == {"FORWARD nb-0a1b2c3d-fwd"}


@dataclass(frozen=True)
class Call:
    argv: tuple[str, ...]
    input: str | None


@dataclass
class Recorder:
    """Records argv and stdin (the restore texts); answers the *-save reads."""

    answers: dict[str, str]
    calls: list[Call] = field(default_factory=list)

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float | None = 60,
        netns: str | None = None,
    ) -> Result:
        text = input.decode() if isinstance(input, bytes) else input
        self.calls.append(Call(tuple(argv), text))
        return Result(tuple(argv), 0, self.answers.get(" ".join(argv), ""), "")


def recording() -> Recorder:
    return Recorder(
        answers={
            "iptables-save -t filter": SAVE,
            "ip6tables-save -t filter": "*filter\nCOMMIT\n",
            "ebtables-save": "*filter\n",
            "ipset list -n": "nb-0a1b2c3d-4stale\nnb-ffffffff-4other\n",
        }
    )


def test_driver_first_pass_replaces_everything_in_one_transaction_per_table() -> None:
    runner = recording()
    fw = Firewall(runner, TAG)
    fw.apply(plan_firewall([CLOSED], {}, TAG))
    argvs = [" ".join(c.argv) for c in runner.calls]
    restores = [c for c in runner.calls if c.argv[0].endswith("-restore")]
    assert [c.argv[0] for c in restores] == [
        "iptables-restore",
        "ip6tables-restore",
        "ebtables-restore",
    ]
    v4 = restores[0].input or ""
    # The stale chain goes in the same transaction; the existing jump stays,
    # INPUT gets its jump; nothing of the other node is named.
    assert "-X nb-0a1b2c3d-iold" in v4 and "-I INPUT 1 -j nb-0a1b2c3d-in" in v4
    assert "-I FORWARD" not in v4 and "ffffffff" not in v4
    assert not any(line.startswith("-F nb-0a1b2c3d-fwd") for line in v4.splitlines())
    assert argvs[-1] == "ipset restore"
    destroyed = [c for c in runner.calls if c.argv[:2] == ("ipset", "restore")][-1].input
    assert destroyed == "destroy nb-0a1b2c3d-4stale\n"


def test_driver_second_pass_writes_only_what_changed() -> None:
    runner = recording()
    fw = Firewall(runner, TAG)
    fw.apply(plan_firewall([WEB], MEMBERS, TAG))
    before = len(runner.calls)
    assert fw.apply(plan_firewall([WEB], MEMBERS, TAG)) == 0
    assert len(runner.calls) == before
    # A membership change is one ipset restore and nothing else.
    members = {GROUP: ("10.0.0.5", "10.0.0.7", "fd00::6")}
    assert fw.apply(plan_firewall([WEB], members, TAG)) == 1
    assert [c.argv for c in runner.calls[before:]] == [("ipset", "restore")]


def test_driver_teardown_removes_jumps_before_chains() -> None:
    runner = recording()
    fw = Firewall(runner, TAG)
    fw.apply(plan_firewall([WEB], MEMBERS, TAG))
    fw.apply(FirewallPlan())
    v4 = [c for c in runner.calls if c.argv[0] == "iptables-restore"][-1].input or ""
    lines = v4.splitlines()
    assert lines.index("-D FORWARD -j nb-0a1b2c3d-fwd") < lines.index("-X nb-0a1b2c3d-fwd")
    assert "-D INPUT -j nb-0a1b2c3d-in" in lines


@pytest.mark.parametrize(
    ("rule", "line"),
    [
        (FwRule("ingress", 4, "any"), "-j ACCEPT"),
        (
            FwRule("egress", 4, "tcp", 80, 80, remote_cidr="10.1.0.0/16"),
            "-d 10.1.0.0/16 -p tcp -m tcp --dport 80 -j ACCEPT",
        ),
        (FwRule("ingress", 6, "icmp"), "-p ipv6-icmp -j ACCEPT"),
        (FwRule("ingress", 4, "sctp", 1, None), "-p sctp -m sctp --dport 1:65535 -j ACCEPT"),
    ],
)
def test_rule_lines(rule: FwRule, line: str) -> None:
    port = FwPort(uid="p", device="tapp", mac="fa:16:3e:00:00:03", rules=(rule,))
    plan = plan_firewall([port], {}, TAG)
    table = plan.ipv4 if rule.family == 4 else plan.ipv6
    chain = Names(TAG).port_chain("i" if rule.direction == "ingress" else "o", "p")
    assert line in table[chain]


def test_remote_group_rule_waits_for_a_member_of_its_family() -> None:
    names = Names(TAG)
    plan = plan_firewall([WEB], {GROUP: ("10.0.0.6",)}, TAG)
    assert list(plan.ipsets) == [names.ipset(4, GROUP)]
    assert not any("match-set" in line for line in plan.ipv6[names.port_chain("i", WEB.uid)])


def test_neighbour_advertisements_only_for_own_addresses() -> None:
    v6 = FwPort(
        uid=WEB.uid,
        device=WEB.device,
        mac=WEB.mac,
        ips=("fd00::5",),
        pairs=(("fd00:1::/60", ""), ("2001:db8::7", "fa:16:3e:00:00:99")),
    )
    egress = plan_firewall([v6], {}, TAG).ipv6[Names(TAG).port_chain("o", v6.uid)]
    adverts = [line for line in egress if "--icmpv6-type 136" in line]
    head = "-p ipv6-icmp -m icmp6 --icmpv6-type 136"
    assert adverts == [
        f"{head} -m u32 --u32 48=0xfd000000&&52=0x0&&56=0x0&&60=0x5 -j ACCEPT",
        f"{head} -m u32 --u32 48=0xfd000001&&52&0xfffffff0=0x0 -j ACCEPT",
        f"{head} -m u32 --u32 48=0x20010db8&&52=0x0&&56=0x0&&60=0x7 -j ACCEPT",
        f"{head} -m u32 --u32 48=0xfe800000&&52=0x0&&56=0xf8163eff&&60=0xfe000001 -j ACCEPT",
        f"{head} -j DROP",
    ]
    # A pair of any address may advertise any target.
    anything = FwPort(uid=v6.uid, device=v6.device, mac=v6.mac, pairs=(("::/0", ""),))
    egress = plan_firewall([anything], {}, TAG).ipv6[Names(TAG).port_chain("o", v6.uid)]
    assert f"{head} -j ACCEPT" in egress
