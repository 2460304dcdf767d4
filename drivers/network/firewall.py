"""Applies a FirewallPlan (firewall_rules.py) through the injected runner.

Every change is a transaction: ipset restore (sets filled under a temporary
name and swapped), then one iptables-restore, ip6tables-restore and
ebtables-restore --noflush each, naming only this node's chains. A chain
declared in a restore is emptied and refilled in the same transaction, so
rules are replaced, never flushed first: an agent that restarts keeps the
old rules in force until its first pass swaps in the new ones. Chains and
sets of other nodes (simulated nodes share the host namespace) and of
anybody else are never named; FORWARD and INPUT only get, or lose, the one
jump to this node's top chain.

Only what changed since the last pass is written; the first pass after a
start reads what exists (`*-save`, `ipset list -n`) and rewrites all of it.

The commands are iptables/ipset binaries rather than netlink libraries:
pyroute2 has no nf_tables or ipset-restore equivalent with the atomic
`restore` semantics this relies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from nubes.drivers.network.firewall_rules import (
    Family,
    FirewallPlan,
    Names,
    ipset_text,
    restore_text,
)
from nubes.drivers.runner import Runner

log = structlog.get_logger()

Chains = dict[str, list[str]]
TABLES = ("ipv4", "ipv6", "ebtables")
RESTORE = {
    "ipv4": ["iptables-restore", "--noflush"],
    "ipv6": ["ip6tables-restore", "--noflush"],
    "ebtables": ["ebtables-restore", "--noflush"],
}
SAVE = {
    "ipv4": ["iptables-save", "-t", "filter"],
    "ipv6": ["ip6tables-save", "-t", "filter"],
    "ebtables": ["ebtables-save"],
}
# Base chain -> this node's chain it jumps to, per table.
HOOKS = {"ipv4": ("FORWARD", "INPUT"), "ipv6": ("FORWARD", "INPUT"), "ebtables": ("FORWARD",)}


def parse_save(text: str, prefix: str) -> tuple[set[str], set[str]]:
    """(own chains, base chains holding a jump to an own chain) from *-save."""
    chains: set[str] = set()
    hooked: set[str] = set()
    for line in text.splitlines():
        if line.startswith(":" + prefix):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A ") and f"-j {prefix}" in line:
            base = line.split()[1]
            if not base.startswith(prefix):
                hooked.add(f"{base} {line.split('-j ', 1)[1].strip()}")
    return chains, hooked


class Firewall:
    def __init__(self, runner: Runner, tag: str):
        self.run = runner
        self.names = Names(tag)
        self._applied: dict[str, Chains] | None = None
        self._hooked: dict[str, set[str]] = {t: set() for t in TABLES}
        self._sets: dict[str, tuple[Family, tuple[str, ...]]] | None = None

    def _read(self) -> None:
        """What exists of this node's firewall (after a start, or on a full pass)."""
        prefix = self.names.prefix
        applied: dict[str, Chains] = {}
        for table in TABLES:
            chains, hooked = parse_save(self.run(SAVE[table]).stdout, prefix)
            # Unknown content: rewritten on the next apply.
            applied[table] = {c: ["?"] for c in chains}
            self._hooked[table] = hooked
        self._applied = applied
        names = self.run(["ipset", "list", "-n"]).stdout.split()
        self._sets = {n: (4, ("?",)) for n in names if n.startswith(prefix)}

    def apply(self, plan: FirewallPlan, *, verify: bool = False) -> int:
        """Bring the node's firewall to `plan`; returns how many commands ran."""
        if self._applied is None or self._sets is None or verify:
            self._read()
        assert self._applied is not None and self._sets is not None
        commands = 0
        changed_sets = {n: s for n, s in plan.ipsets.items() if self._sets.get(n) != s}
        if changed_sets:
            self.run(["ipset", "restore"], input=ipset_text(changed_sets, self.names))
            commands += 1
        for table in TABLES:
            wanted: Mapping[str, list[str]] = getattr(plan, table)
            commands += self._apply_table(table, wanted)
        stale_sets = [n for n in self._sets if n not in plan.ipsets]
        if stale_sets:
            self.run(["ipset", "restore"], input="".join(f"destroy {n}\n" for n in stale_sets))
            commands += 1
        self._sets = dict(plan.ipsets)
        return commands

    def _apply_table(self, table: str, wanted: Mapping[str, list[str]]) -> int:
        assert self._applied is not None
        applied = self._applied[table]
        changed = {c: lines for c, lines in wanted.items() if applied.get(c) != lines}
        stale = [c for c in applied if c not in wanted]
        hooks = self._hook_lines(table, wanted)
        if not changed and not stale and not hooks:
            return 0
        text = restore_text(changed, ebtables=table == "ebtables", delete=stale, extra=hooks)
        self.run(RESTORE[table], input=text)
        self._applied[table] = {c: list(lines) for c, lines in wanted.items()}
        return 1

    def _hook_lines(self, table: str, wanted: Mapping[str, Sequence[str]]) -> list[str]:
        """Jumps from the base chains to this node's top chain: inserted when
        the top chain is wanted and the jump is missing, deleted (before the
        chain goes) when it is not wanted."""
        top = self.names.forward if table == "ebtables" else None
        lines: list[str] = []
        for base in HOOKS[table]:
            target = top or (self.names.forward if base == "FORWARD" else self.names.input)
            jump = f"{base} {target}"
            if target in wanted and jump not in self._hooked[table]:
                lines.append(f"-I {base} 1 -j {target}")
                self._hooked[table].add(jump)
            elif target not in wanted and jump in self._hooked[table]:
                lines.append(f"-D {base} -j {target}")
                self._hooked[table].discard(jump)
        return lines

    def remove_all(self) -> None:
        """Everything of this node's firewall (tests, node decommissioning)."""
        self.apply(FirewallPlan(), verify=True)
