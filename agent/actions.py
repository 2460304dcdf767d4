"""Carrying out InstanceActions on the node.

In place (the instance's node does everything): reboots, snapshot (root
disk flattened into the image store, for the controller to import as an
Image), rebuild (a new root disk from another image), rescue/unrescue, and a
Resize that stays on the node. Moves (Migrate, Resize to another node) take
two agents: the source stops the guest and flattens its disk into the image
store (`transfer`), the target builds the instance from it and finishes the
action; the controller then moves the instance, and the source collects
what is left. Each agent writes only its own fields of the action's status.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nubes.api.compute import (
    ActionError,
    DiskTransfer,
    Instance,
    InstanceAction,
    InstanceActionStatus,
)
from nubes.api.meta import now_precise
from nubes.drivers.compute.libvirt import DomainState
from nubes.drivers.compute.node import ComputeNode
from nubes.drivers.images.cache import ImageSource
from nubes.drivers.images.store import internal_path, internal_ref
from nubes.drivers.problem import fail, problem_of
from nubes.runtime.status_apply import apply_status

if TYPE_CHECKING:
    from nubes.agent.compute import InstanceAgent
    from nubes.agent.compute_plan import Plan

log = structlog.get_logger()


def is_move(action: InstanceAction) -> bool:
    s = action.status
    return action.spec.action in ("Migrate", "Resize") and s.target_node != s.source_node


class ActionRunner:
    def __init__(self, agent: InstanceAgent):
        self.agent = agent

    @property
    def node(self) -> ComputeNode:
        """The node driver's verbs do the work."""
        return self.agent.compute

    async def _patch(self, action: InstanceAction, status: InstanceActionStatus) -> None:
        await apply_status(self.agent.op.kube, action, status.patch(), refresh_when_stale=True)

    async def step(self, inst: Instance, action: InstanceAction, plan: Plan | None) -> bool:
        """Advance the action as far as this node can. True when the caller
        must not converge the domain now (a move is under way)."""
        me = self.agent.node
        s = action.status
        if is_move(action):
            if me == s.source_node:
                if not s.transfer:
                    await self._patch(action, InstanceActionStatus(started_at=now_precise()))
                    transfer = await asyncio.to_thread(self._export, inst, action)
                    await self._patch(action, InstanceActionStatus(transfer=transfer))
                return True  # stopped until the target has it
            if me == s.target_node and s.transfer and plan is not None:
                await self._run(action, self._import, inst, action, plan)
            return True
        if me != s.source_node or plan is None:
            return False
        if not s.started_at:
            await self._patch(action, InstanceActionStatus(started_at=now_precise()))
        await self._run(action, self._in_place, inst, action, plan)
        return False

    async def _run(self, action: InstanceAction, fn: Any, *args: Any) -> None:
        try:
            outcome: InstanceActionStatus = await asyncio.to_thread(fn, *args)
        except Exception as e:  # reported on the action; the instance stays as it was
            problem = problem_of(e)
            log.warning("action failed", action=action.key, reason=problem.reason, error=str(e))
            outcome = InstanceActionStatus(
                error=ActionError(reason=problem.reason, message=problem.message)
            )
        outcome.completed_at = now_precise()
        await self._patch(action, outcome)

    # --- blocking work -------------------------------------------------------------

    def _name(self, inst: Instance) -> str:
        return self.agent.domain_name(inst)

    def _in_place(self, inst: Instance, action: InstanceAction, plan: Plan) -> InstanceActionStatus:
        kind = action.spec.action
        name = self._name(inst)
        if kind in ("SoftReboot", "HardReboot"):
            if self.node.state(name) != DomainState.RUNNING:
                raise fail(
                    "InstanceNotRunning", f"instance {inst.name} is not running", retryable=False
                )
            # A rebooted guest starts afresh on its ports: only on bound ones.
            unbound = self.agent.unbound_ports(plan)
            if unbound:
                why = "; ".join(map(str, unbound)) + f": {kind} not done"
                raise fail("PortNotBound", why, retryable=False)
            self.node.reboot(name, hard=kind == "HardReboot")
            return InstanceActionStatus(result=f"{kind} done")
        if kind == "Snapshot":
            return self._snapshot(inst, action)
        if kind == "Rebuild":
            source = self._image_source(action)
            self.node.stop(name)
            self.node.replace_disk(source, self.agent.instance_dir(inst) / "disk", plan.disk_bytes)
            return InstanceActionStatus(result=f"rebuilt from {action.status.image}")
        if kind == "Rescue":
            source = self._image_source(action)
            self.node.stop(name)
            self.node.replace_disk(source, self.agent.rescue_disk(inst), None)
            return InstanceActionStatus(result=f"rescue disk from {action.status.image}")
        if kind == "Unrescue":
            self.node.stop(name)
            self.node.delete_disk(self.agent.rescue_disk(inst))
            return InstanceActionStatus(result="booting from the root disk again")
        if kind == "Resize":
            self.node.stop(name)
            return InstanceActionStatus(
                result=f"resized to {action.status.flavor} on {self.agent.node}"
            )
        raise fail("UnsupportedAction", f"{kind} cannot run in place", retryable=False)

    def _image_source(self, action: InstanceAction) -> ImageSource:
        """The image the controller resolved for a Rebuild or Rescue."""
        source = action.status.image_source
        if source is None:
            raise fail("ImageNotReady", f"image {action.status.image} is not resolved yet")
        return self.agent.store_source(source)

    def _snapshot(self, inst: Instance, action: InstanceAction) -> InstanceActionStatus:
        """Flatten the root disk; a running guest is paused meanwhile so the
        copy is consistent."""
        name = self._name(inst)
        was_running = self.node.state(name) == DomainState.RUNNING
        if was_running:
            self.node.pause(name)
        try:
            ref = internal_ref("snapshots", action.uid)
            target = internal_path(str(self.agent.store_dir), ref)
            disk = self.agent.instance_dir(inst) / "disk"
            snap = self.node.flatten(disk, target, force_share=True)
        finally:
            if was_running:
                self.node.unpause(name)
        return InstanceActionStatus(
            transfer=DiskTransfer(ref=ref, sha256=snap.sha256), result=action.spec.image_name
        )

    def _export(self, inst: Instance, action: InstanceAction) -> DiskTransfer:
        """Source side of a move: stop, then flatten the disk into the store."""
        name = self._name(inst)
        self.node.stop(name)
        ref = internal_ref("transfers", action.uid)
        target = internal_path(str(self.agent.store_dir), ref)
        snap = self.node.flatten(self.agent.instance_dir(inst) / "disk", target)
        return DiskTransfer(ref=ref, sha256=snap.sha256)

    def _import(self, inst: Instance, action: InstanceAction, plan: Plan) -> InstanceActionStatus:
        """Target side of a move: the instance's disk from the transfer, then
        the domain, in the power state the instance wants. Its ports are still
        bound to the source node here, so the domain is only defined (VIFs
        plugged isolated); it starts once the controller has moved the
        instance and its ports are bound on this node."""
        transfer = action.status.transfer
        assert transfer is not None
        path = internal_path(str(self.agent.store_dir), transfer.ref)
        source = ImageSource(path, transfer.sha256, "qcow2")
        moved = dataclasses.replace(plan, root_source=source)
        self.agent.local.add(inst.uid)
        self.agent.converge_domain(moved)
        # The node's cache holds the base now; the store copy can go.
        Path(path).unlink(missing_ok=True)
        return InstanceActionStatus(
            result=f"moved from {action.status.source_node} to {self.agent.node}"
        )
