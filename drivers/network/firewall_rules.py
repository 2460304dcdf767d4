"""Security groups and port security as iptables, ip6tables, ebtables and
ipset contents: a pure planner, golden-tested (tests/unit/drivers).

Why the iptables hybrid way and not OVS conntrack flows: every guest NIC
already sits on its own Linux bridge (qbr, see vif.py), the kernel here has
br_netfilter, physdev, ebtables, conntrack and ipset, and the rules of one
port then live in chains of their own that can be replaced atomically
(iptables-restore --noflush) without touching br-int's flow table, which
NodeSwitch rewrites as a whole. OVS conntrack would need the userspace
datapath's conntrack on every frame of every port and conjunction flows for
remote groups; it may come later behind the same planner inputs.

Layout, per node (`tag` keeps the agents of simulated nodes that share one
host namespace apart; each agent touches only names with its own prefix):

- `nb-<tag>-fwd` (jumped to from FORWARD) and `nb-<tag>-in` (from INPUT):
  one physdev jump per direction per filtered port.
- `nb-<tag>-i<port>`: traffic to the guest. Stateful accept of replies,
  DHCP replies and IPv6 neighbour discovery, then the ingress rules, DROP.
- `nb-<tag>-o<port>`: traffic from the guest. DHCP/DAD before an address,
  the spoof chain, no DHCP server or router advertisement, stateful
  replies, the egress rules, DROP.
- `nb-<tag>-s<port>`: source IP + MAC pairs the port may send from (fixed
  IPs, allowed address pairs, the EUI-64 link-local address), DROP.
- ebtables `nb-<tag>-a<port>` (from `nb-<tag>-fwd` on FORWARD and INPUT):
  ARP only for the port's own (IP, MAC) pairs, frames only from its MACs.
- ipset `nb-<tag>-<4|6><group>`: addresses of a remote group's members, so
  a membership change is one set swap, not a rule rewrite.

A port with port security off has no chain and no jump: it is open.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Family = Literal[4, 6]
Direction = Literal["ingress", "egress"]

NAMED_PROTOCOLS = {"tcp": "6", "udp": "17", "sctp": "132", "icmp": "1", "icmpv6": "58"}
# ICMPv6 the guest must receive (MLD query/report/done, RA, NS, NA) and may
# send once its source is checked (RS, NS, MLD report; NAs for its own
# addresses only, _neighbour_adverts).
ND_INGRESS = (130, 131, 132, 134, 135, 136)
ND_EGRESS = (131, 133, 135, 143)
NEIGHBOUR_ADVERT = 136
# An NA's target address: bytes 8 to 23 of the ICMPv6 message, after the
# 40-byte IPv6 header (the offsets u32 reads). One with extension headers
# between moves it, fails the match and is dropped.
NA_TARGET_OFFSET = 48
# Before it has an address a guest sends DHCP discovers from 0.0.0.0 and
# DAD/MLD from ::.
DAD_TYPES = (131, 135, 143)


def node_tag(node: str) -> str:
    """8 hex characters of the node name's digest: a fixed-length, name-safe
    prefix part (iptables chain names hold 28 characters, ipset names 31)."""
    return hashlib.sha256(node.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class FwRule:
    """A security group rule, resolved: remote_group is a group uid."""

    direction: Direction
    family: Family
    protocol: str = "any"
    """any, tcp, udp, sctp, icmp, icmpv6 or a protocol number."""
    port_min: int | None = None
    port_max: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None


@dataclass(frozen=True)
class FwPort:
    uid: str
    device: str
    """The guest-side device on the port's qbr (tap...)."""
    mac: str
    ips: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    """Allowed address pairs: (IP or CIDR, MAC)."""
    rules: tuple[FwRule, ...] = ()


@dataclass(frozen=True)
class FirewallPlan:
    """Chain name -> rule lines (arguments after `-A <chain>`), per table."""

    ipv4: dict[str, list[str]] = field(default_factory=dict)
    ipv6: dict[str, list[str]] = field(default_factory=dict)
    ebtables: dict[str, list[str]] = field(default_factory=dict)
    ipsets: dict[str, tuple[Family, tuple[str, ...]]] = field(default_factory=dict)
    """Set name -> (family, members)."""


@dataclass(frozen=True)
class Names:
    tag: str

    @property
    def prefix(self) -> str:
        return f"nb-{self.tag}-"

    @property
    def forward(self) -> str:
        return f"{self.prefix}fwd"

    @property
    def input(self) -> str:
        return f"{self.prefix}in"

    def port_chain(self, kind: str, port_uid: str) -> str:
        return f"{self.prefix}{kind}{port_uid.replace('-', '')[:12]}"

    def ipset(self, family: Family, group_uid: str) -> str:
        return f"{self.prefix}{family}{group_uid.replace('-', '')[:16]}"

    def temp_ipset(self, name: str) -> str:
        return f"{self.prefix}t{name[len(self.prefix) :]}"


def family_of(address: str) -> Family:
    return 4 if ipaddress.ip_network(address, strict=False).version == 4 else 6


def eui64_link_local(mac: str) -> str:
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    groups = [f"{eui[i] << 8 | eui[i + 1]:x}" for i in range(0, 8, 2)]
    return str(ipaddress.ip_address("fe80::" + ":".join(groups)))


def _host(address: str) -> str:
    net = ipaddress.ip_network(address, strict=False)
    return str(net)


def _protocol_args(rule: FwRule) -> list[str]:
    proto = rule.protocol
    if proto == "any":
        return []
    if proto in ("icmp", "icmpv6", "1", "58"):
        # Neutron's way: "icmp" in an IPv6 rule means ICMPv6.
        if rule.family == 4:
            args = ["-p", "icmp"]
            if rule.icmp_type is not None:
                code = f"/{rule.icmp_code}" if rule.icmp_code is not None else ""
                args += ["-m", "icmp", "--icmp-type", f"{rule.icmp_type}{code}"]
            return args
        args = ["-p", "ipv6-icmp"]
        if rule.icmp_type is not None:
            code = f"/{rule.icmp_code}" if rule.icmp_code is not None else ""
            args += ["-m", "icmp6", "--icmpv6-type", f"{rule.icmp_type}{code}"]
        return args
    if proto in ("tcp", "udp", "sctp"):
        args = ["-p", proto]
        if rule.port_min is not None or rule.port_max is not None:
            low = rule.port_min or 1
            high = rule.port_max or 65535
            ports = str(low) if low == high else f"{low}:{high}"
            args += ["-m", proto, "--dport", ports]
        return args
    return ["-p", NAMED_PROTOCOLS.get(proto, proto)]


def _rule_line(rule: FwRule, names: Names) -> str:
    peer = "-s" if rule.direction == "ingress" else "-d"
    args: list[str] = []
    if rule.remote_cidr:
        args += [peer, _host(rule.remote_cidr)]
    args += _protocol_args(rule)
    if rule.remote_group:
        where = "src" if rule.direction == "ingress" else "dst"
        args += ["-m", "set", "--match-set", names.ipset(rule.family, rule.remote_group), where]
    return " ".join([*args, "-j", "ACCEPT"])


def _icmpv6(types: Iterable[int], target: str, source: str | None = None) -> list[str]:
    src = f"-s {source} " if source else ""
    return [f"{src}-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j {target}" for t in types]


def _na_target_match(cidr: str) -> str | None:
    """A u32 test that an NA's target lies in `cidr` (None: any target)."""
    net = ipaddress.IPv6Network(cidr, strict=False)
    value, tests = int(net.network_address), []
    for word in range(4):
        bits = min(32, net.prefixlen - 32 * word)
        if bits <= 0:
            break
        part = (value >> (96 - 32 * word)) & 0xFFFFFFFF
        offset = NA_TARGET_OFFSET + 4 * word
        if bits == 32:
            tests.append(f"{offset}={part:#x}")
        else:
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
            tests.append(f"{offset}&{mask:#x}={part:#x}")
    return "&&".join(tests) or None


def _neighbour_adverts(port: FwPort) -> list[str]:
    """NAs only for the port's own addresses: ip6tables checked the source
    only, and an NA for a neighbour's address with the guest's MAC would
    poison every cache on the network (Neutron matches nd_target)."""
    head = f"-p ipv6-icmp -m icmp6 --icmpv6-type {NEIGHBOUR_ADVERT}"
    lines: dict[str, None] = {}
    for src, _ in _sources(port, 6):
        match = _na_target_match(src)
        lines.setdefault(f"{head} -m u32 --u32 {match} -j ACCEPT" if match else f"{head} -j ACCEPT")
    return [*lines, f"{head} -j DROP"]


def _sources(port: FwPort, family: Family) -> list[tuple[str, str]]:
    """(address or CIDR, MAC) pairs the port may send from."""
    out = [(_host(ip), port.mac) for ip in port.ips if family_of(ip) == family]
    out += [
        (_host(ip), (mac or port.mac).lower()) for ip, mac in port.pairs if family_of(ip) == family
    ]
    if family == 6:
        out.append((f"{eui64_link_local(port.mac)}/128", port.mac))
    return out


def _wanted_rules(
    port: FwPort, family: Family, direction: Direction, live: set[tuple[Family, str]]
) -> list[FwRule]:
    """The port's rules of one family and direction, without duplicates and
    without remote-group rules whose group has no member of the family yet
    (they would match nothing; leaving them out saves a set: the kernel
    holds at most 256)."""
    seen: dict[FwRule, None] = {}
    for rule in port.rules:
        if rule.family != family or rule.direction != direction:
            continue
        if rule.remote_group and (family, rule.remote_group) not in live:
            continue
        seen.setdefault(rule)
    return list(seen)


def _port_chains(
    port: FwPort, family: Family, names: Names, live: set[tuple[Family, str]]
) -> dict[str, list[str]]:
    ingress = names.port_chain("i", port.uid)
    egress = names.port_chain("o", port.uid)
    spoof = names.port_chain("s", port.uid)
    i_lines = [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
    ]
    if family == 4:
        i_lines.append("-p udp -m udp --sport 67 --dport 68 -j ACCEPT")
    else:
        i_lines += _icmpv6(ND_INGRESS, "ACCEPT")
        i_lines.append("-p udp -m udp --sport 547 --dport 546 -j ACCEPT")
    i_lines += [_rule_line(r, names) for r in _wanted_rules(port, family, "ingress", live)]
    i_lines.append("-j DROP")

    if family == 4:
        o_lines = [
            "-s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp --sport 68 --dport 67 -j ACCEPT"
        ]
    else:
        o_lines = _icmpv6(DAD_TYPES, "ACCEPT", "::/128")
    o_lines.append(f"-j {spoof}")
    if family == 4:
        o_lines += [
            "-p udp -m udp --sport 68 --dport 67 -j ACCEPT",
            "-p udp -m udp --sport 67 --dport 68 -j DROP",
        ]
    else:
        o_lines += _icmpv6((134,), "DROP")
        o_lines += _neighbour_adverts(port)
        o_lines += _icmpv6(ND_EGRESS, "ACCEPT")
        o_lines += [
            "-p udp -m udp --sport 546 --dport 547 -j ACCEPT",
            "-p udp -m udp --sport 547 --dport 546 -j DROP",
        ]
    o_lines += [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
    ]
    o_lines += [_rule_line(r, names) for r in _wanted_rules(port, family, "egress", live)]
    o_lines.append("-j DROP")

    s_lines = [
        f"-s {src} -m mac --mac-source {mac} -j RETURN" for src, mac in _sources(port, family)
    ]
    s_lines.append("-j DROP")
    return {ingress: i_lines, egress: o_lines, spoof: s_lines}


def _arp_chain(port: FwPort) -> list[str]:
    lines = []
    pairs = [(ip, mac) for ip, mac in _sources(port, 4)]
    for src, mac in [("0.0.0.0/32", port.mac), *pairs]:
        ip = src.removesuffix("/32")
        lines.append(f"-p ARP -s {mac} --arp-ip-src {ip} --arp-mac-src {mac} -j RETURN")
    lines.append("-p ARP -j DROP")
    macs = dict.fromkeys([port.mac, *((m or port.mac).lower() for _, m in port.pairs)])
    lines += [f"-s {mac} -j RETURN" for mac in macs]
    lines.append("-j DROP")
    return lines


def plan_firewall(
    ports: Sequence[FwPort], members: Mapping[str, Sequence[str]], tag: str
) -> FirewallPlan:
    """The node's whole firewall. `ports` are the filtered ports bound here
    (port security on); `members` maps a group uid to its members' addresses."""
    names = Names(tag)
    plan = FirewallPlan()
    if not ports:
        return plan  # nothing filtered here: no chain, no jump, no set
    tables: dict[Family, dict[str, list[str]]] = {4: plan.ipv4, 6: plan.ipv6}
    for table in tables.values():
        table[names.forward] = []
        table[names.input] = []
    plan.ebtables[names.forward] = []
    addresses: dict[tuple[Family, str], tuple[str, ...]] = {}
    for group in sorted({r.remote_group for p in ports for r in p.rules if r.remote_group}):
        for family in (4, 6):
            found = sorted(
                {_host(a) for a in members.get(group, ()) if family_of(a) == family},
                key=ipaddress.ip_network,
            )
            if found:
                addresses[(family, group)] = tuple(found)
    live = set(addresses)
    for port in sorted(ports, key=lambda p: p.uid):
        for family, table in tables.items():
            chains = _port_chains(port, family, names, live)
            ingress, egress = names.port_chain("i", port.uid), names.port_chain("o", port.uid)
            table[names.forward] += [
                f"-m physdev --physdev-out {port.device} --physdev-is-bridged -j {ingress}",
                f"-m physdev --physdev-in {port.device} --physdev-is-bridged -j {egress}",
            ]
            table[names.input].append(f"-m physdev --physdev-in {port.device} -j {egress}")
            table.update(chains)
        arp = names.port_chain("a", port.uid)
        plan.ebtables[names.forward].append(f"-i {port.device} -j {arp}")
        plan.ebtables[arp] = _arp_chain(port)
    used = {
        (r.family, r.remote_group)
        for p in ports
        for r in p.rules
        if r.remote_group and (r.family, r.remote_group) in live
    }
    for family, group in sorted(used):
        plan.ipsets[names.ipset(family, group)] = (family, addresses[(family, group)])
    return plan


def restore_text(
    chains: Mapping[str, Sequence[str]],
    *,
    ebtables: bool = False,
    delete: Iterable[str] = (),
    extra: Sequence[str] = (),
) -> str:
    """iptables-restore (or ebtables-restore) input for `--noflush`:
    declaring a chain empties it, so each listed chain is replaced as a
    whole, in one transaction with the others. `extra` lines (jumps from
    the base chains) come after the chains exist; `delete` chains are
    emptied and removed last, once nothing jumps to them."""
    policy = "RETURN" if ebtables else "- [0:0]"
    out = ["*filter"]
    out += [f":{name} {policy}" for name in chains]
    for name, lines in chains.items():
        out += [f"-A {name} {line}" for line in lines]
    out += list(extra)
    gone = list(delete)
    out += [f"-F {name}" for name in gone]
    out += [f"-X {name}" for name in gone]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def ipset_text(sets: Mapping[str, tuple[Family, Sequence[str]]], names: Names) -> str:
    """`ipset restore` input: each set is filled under a temporary name and
    swapped in, so a reader of the set never sees it half filled."""
    out = []
    for name, (family, members) in sets.items():
        inet = "inet" if family == 4 else "inet6"
        temp = names.temp_ipset(name)
        out.append(f"create {name} hash:net family {inet} -exist")
        out.append(f"create {temp} hash:net family {inet} -exist")
        out.append(f"flush {temp}")
        out += [f"add {temp} {member}" for member in members]
        out.append(f"swap {temp} {name}")
        out.append(f"destroy {temp}")
    return "\n".join(out) + "\n"
