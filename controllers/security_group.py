"""SecurityGroup: membership and validity, for the agents that enforce it.

The agents enforce security groups on the nodes (agent/firewall.py); this
reconciler gives them what only a cluster-wide view knows:
- `status.members`: the fixed addresses of the ports using the group (the
  Port reconciler resolves each port's groups into `status.securityGroups`),
  which rules of other groups naming this one as `remoteGroup` match. An
  agent turns it into one ipset, so a port joining a group is one set swap
  on every node that filters against it.
- `Stalled`: a rule naming a remote group that does not exist in the
  project (`RemoteGroupNotFound`; another project's group cannot be named at
  all, remoteGroup is a name in the group's own namespace), or more rules in
  the project than its `securityGroupRules` quota (`QuotaExceeded`). Agents
  enforce a group only while it is not stalled, and a port using a group
  that is not enforceable gets none of its rules (fail closed).

Every project gets a `default` group with its namespace (controllers/
project.py), with Neutron's default rules, made again by that reconciler
when deleted; in a namespace that is not a project's the Port reconciler
makes it on first use, as Neutron does.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any

from nubes.api.identity import Project
from nubes.api.network import Port, SecurityGroup, SecurityGroupStatus
from nubes.controllers import quota
from nubes.runtime.kube import ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

DEFAULT_GROUP = "default"
QUOTA_FIELD = "security_group_rules"
MEMBERSHIP_PACE = 0.5
"""Seconds between two writes of a group's new members: a burst of ports
joins in a few writes instead of one per reconcile, while a lone change
still goes out at once."""


def default_group(namespace: str) -> dict[str, Any]:
    """Neutron's default group: egress anywhere, ingress from its members."""
    rules = [
        {"direction": "egress", "ethertype": "IPv4"},
        {"direction": "egress", "ethertype": "IPv6"},
        {"direction": "ingress", "ethertype": "IPv4", "remoteGroup": DEFAULT_GROUP},
        {"direction": "ingress", "ethertype": "IPv6", "remoteGroup": DEFAULT_GROUP},
    ]
    return {
        "apiVersion": SecurityGroup.crd.api_version,
        "kind": "SecurityGroup",
        "metadata": {"name": DEFAULT_GROUP, "namespace": namespace},
        "spec": {"description": "Default security group", "rules": rules},
    }


_making: weakref.WeakKeyDictionary[Operator, dict[str, asyncio.Future[None]]] = (
    weakref.WeakKeyDictionary()
)
"""Default groups being made, per operator and namespace: the first port
of a namespace comes with many at once, and they share one create."""


async def ensure_default_group(op: Operator, namespace: str) -> None:
    """The namespace's `default` group, made if missing; left as its users
    changed it otherwise."""
    if op.store(SecurityGroup).lookup(DEFAULT_GROUP, namespace) is not None:
        return
    pending = _making.setdefault(op, {})
    making = pending.get(namespace)
    if making is None:
        making = pending[namespace] = asyncio.ensure_future(_make_default_group(op, namespace))

        def done(future: asyncio.Future[None]) -> None:
            pending.pop(namespace, None)
            # Read when every waiter was cancelled: no "never retrieved" noise.
            if not future.cancelled():
                future.exception()

        making.add_done_callback(done)
    # A waiter cancelled (its worker stopping) leaves the create to the others.
    await asyncio.shield(making)


async def _make_default_group(op: Operator, namespace: str) -> None:
    groups = path_of(SecurityGroup)
    if await op.kube.get_raw(groups, DEFAULT_GROUP, namespace) is not None:
        return
    try:
        await op.kube.create_raw(groups, default_group(namespace), namespace)
    except ApiError as e:
        # 403: a securityGroups quota of 0 leaves no room for it.
        if not e.conflict and e.status != 403:
            raise


def members_of(ports: list[Port]) -> list[str]:
    addresses = {
        f.ip_address for p in ports if not p.deleting for f in p.status.fixed_ips if f.ip_address
    }
    return sorted(addresses)


class Pacer:
    """At most one change per key and interval."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}

    def wait(self, key: str) -> float:
        """0 when `key` may change now (recorded as its change), else the
        seconds until it may."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return self.interval - (now - last)
        self._last[key] = now
        return 0.0

    def forget(self, key: str) -> None:
        self._last.pop(key, None)


def rules_before(group: SecurityGroup, groups: list[SecurityGroup], limit: int) -> int:
    """Rules held by the project's groups that came before this one
    (creation time, then name) and fit under the limit themselves: they keep
    their place, the newest group that would go over is the one refused, and
    a refused group holds nothing (it is not enforced)."""

    def order(g: SecurityGroup) -> tuple[str, str]:
        return (g.metadata.creation_timestamp or "", g.name)

    held = 0
    for g in sorted(groups, key=order):
        if g.deleting or g.uid == group.uid:
            continue
        if order(g) >= order(group):
            break
        if held + len(g.spec.rules) <= limit:
            held += len(g.spec.rules)
    return held


def _member_facts(port: Port | None) -> tuple[Any, ...] | None:
    if port is None:
        return None
    return (
        tuple(port.status.security_groups),
        tuple(f.ip_address for f in port.status.fixed_ips),
        port.deleting,
    )


class SecurityGroupReconciler(Reconciler[SecurityGroup]):
    kind = SecurityGroup
    workers = 2

    def setup(self, op: Operator) -> None:
        super().setup(op)
        ports = op.store(Port)
        ports.add_index(
            "security-group", lambda p: [f"{p.namespace}/{g}" for g in p.status.security_groups]
        )
        groups = op.store(SecurityGroup)
        groups.add_index("sg-namespace", lambda g: [g.namespace or ""])
        op.watch(
            Port,
            SecurityGroup,
            lambda p: [f"{p.namespace}/{g}" for g in p.status.security_groups],
            when=lambda old, new: _member_facts(old) != _member_facts(new),
        )
        # A group appearing, going or changing its rules changes the verdict
        # (remote groups, rule quota) of its project's other groups.
        op.watch(
            SecurityGroup,
            SecurityGroup,
            lambda g: [x.key for x in groups.by_index("sg-namespace", g.namespace or "")],
            when=lambda old, new: (
                old is None or new is None or len(old.spec.rules) != len(new.spec.rules)
            ),
        )
        quota.index_consumers(op)
        projects = op.store(Project)
        op.watch(
            Project,
            SecurityGroup,
            lambda p: [
                x.key for x in groups.by_index("sg-namespace", p.status.namespace or p.name)
            ],
            when=lambda old, new: (
                old is None
                or new is None
                or old.spec.quotas.security_group_rules != new.spec.quotas.security_group_rules
            ),
        )
        self.projects = projects
        self.pace = Pacer(MEMBERSHIP_PACE)

    def _rule_limit(self, namespace: str) -> int | None:
        for project in self.projects.by_index("namespace", namespace):
            return quota.limit_of(project.spec.quotas, QUOTA_FIELD)
        return None

    async def converge(self, obj: SecurityGroup) -> Outcome:
        namespace = obj.namespace or ""
        using = self.op.store(Port).by_index("security-group", obj.key)
        ports = len([p for p in using if not p.deleting])
        status = SecurityGroupStatus(ports=ports, members=members_of(using))
        siblings = self.op.store(SecurityGroup).by_index("sg-namespace", namespace)
        known = {g.name for g in siblings if not g.deleting}
        for index, rule in enumerate(obj.spec.rules):
            if rule.remote_group and rule.remote_group not in known:
                return Outcome.stalled(
                    "RemoteGroupNotFound",
                    f"rules[{index}]: remoteGroup {rule.remote_group} does not exist in"
                    f" project namespace {namespace}",
                    status,
                )
        limit = self._rule_limit(namespace)
        if limit is not None:
            used = rules_before(obj, siblings, limit)
            if used + len(obj.spec.rules) > limit:
                return Outcome.stalled(
                    "QuotaExceeded",
                    f"securityGroupRules: {used} of {limit} in use, this group needs"
                    f" {len(obj.spec.rules)}",
                    status,
                )
        held = self._held_back(obj, status)
        if held is not None:
            return held
        rules = len(obj.spec.rules)
        return Outcome.ready(
            status,
            f"{rules} rule{'s' if rules != 1 else ''}, {ports} port{'s' if ports != 1 else ''}",
        )

    def _held_back(self, obj: SecurityGroup, status: SecurityGroupStatus) -> Outcome | None:
        """The group as it stands, while its members grew less than a pace
        ago. Only growth waits: an address leaving a group leaves its
        remote-group rules at once (fail closed)."""
        if (status.ports, status.members) == (obj.status.ports, obj.status.members):
            return None
        ready = obj.status.condition("Ready")
        if (
            ready is None
            or ready.status != "True"
            or ready.observed_generation != obj.metadata.generation
            or not set(obj.status.members) <= set(status.members)
        ):
            return None
        wait = self.pace.wait(obj.key)
        if not wait:
            return None
        now = SecurityGroupStatus(ports=obj.status.ports, members=obj.status.members)
        return Outcome.ready(now, ready.message, requeue_after=wait)

    async def forget(self, key: str) -> None:
        self.pace.forget(key)
