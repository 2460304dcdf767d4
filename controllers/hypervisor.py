"""Hypervisor readiness: a node is Ready while its agent heartbeats."""

from __future__ import annotations

from nubes.api.compute import Hypervisor
from nubes.api.meta import seconds_since
from nubes.runtime.reconcile import Outcome, Reconciler

# Three missed beats of the agent (which beats every 20 s) mark a node down.
HEARTBEAT_TIMEOUT = 60.0


def alive(hv: Hypervisor) -> bool:
    """Heartbeating now: judged from the heartbeat itself, not from a Ready
    condition that a previous controller may have written long ago."""
    age = seconds_since(hv.status.heartbeat_time)
    return age is not None and age <= HEARTBEAT_TIMEOUT and not hv.deleting


def usable(hv: Hypervisor) -> bool:
    """Takes new work: alive and not disabled by an operator."""
    return alive(hv) and not hv.spec.disabled


class HypervisorReconciler(Reconciler[Hypervisor]):
    kind = Hypervisor
    workers = 1

    async def converge(self, obj: Hypervisor) -> Outcome:
        age = seconds_since(obj.status.heartbeat_time)
        if age is None:
            return Outcome.progressing("WaitingForAgent", "the node agent has not reported yet")
        if age > HEARTBEAT_TIMEOUT:
            return Outcome.stalled(
                "AgentDown", f"no heartbeat from the node agent for {int(age)} s"
            )
        if obj.spec.disabled:
            return Outcome.ready(
                message="disabled: takes no new instances",
                reason="Disabled",
                requeue_after=HEARTBEAT_TIMEOUT - age + 1,
            )
        return Outcome.ready(
            message="agent heartbeating", requeue_after=HEARTBEAT_TIMEOUT - age + 1
        )
