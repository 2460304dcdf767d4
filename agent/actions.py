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

from nubes.agent.image_source import source_of
from nubes.api.compute import ActionError, Instance, InstanceAction
from nubes.api.image import Image
from nubes.api.meta import now_precise
from nubes.drivers.compute.libvirt import DomainState
from nubes.drivers.hostfiles import private_file
from nubes.drivers.images.cache import ImageSource
from nubes.drivers.images.store import internal_path, internal_ref
from nubes.drivers.problem import fail, problem_of
from nubes.runtime.kube import path_of

if TYPE_CHECKING:
    from nubes.agent.compute import InstanceAgent, Plan

log = structlog.get_logger()

SHUTDOWN_TIMEOUT = 30.0


def is_move(action: InstanceAction) -> bool:
    s = action.status
    return action.spec.action in ("Migrate", "Resize") and s.target_node != s.source_node


class ActionRunner:
    def __init__(self, agent: InstanceAgent):
        self.agent = agent
        self.libvirt = agent.libvirt
        self.cache = agent.cache

    async def _patch(self, action: InstanceAction, status: dict[str, Any]) -> None:
        await self.agent.op.kube.patch_raw(
            path_of(InstanceAction),
            action.name,
            {"status": status},
            action.namespace,
            subresource="status",
        )

    async def step(self, inst: Instance, action: InstanceAction, plan: Plan | None) -> bool:
        """Advance the action as far as this node can. True when the caller
        must not converge the domain now (a move is under way)."""
        me = self.agent.node
        s = action.status
        if is_move(action):
            if me == s.source_node:
                if not s.transfer:
                    await self._patch(action, {"startedAt": now_precise()})
                    transfer = await asyncio.to_thread(self._export, inst, action)
                    await self._patch(action, {"transfer": transfer})
                return True  # stopped until the target has it
            if me == s.target_node and s.transfer and plan is not None:
                await self._run(action, self._import, inst, action, plan)
            return True
        if me != s.source_node or plan is None:
            return False
        if not s.started_at:
            await self._patch(action, {"startedAt": now_precise()})
        await self._run(action, self._in_place, inst, action, plan)
        return False

    async def _run(self, action: InstanceAction, fn: Any, *args: Any) -> None:
        try:
            outcome: dict[str, Any] = await asyncio.to_thread(fn, *args)
        except Exception as e:  # reported on the action; the instance stays as it was
            problem = problem_of(e)
            log.warning("action failed", action=action.key, reason=problem.reason, error=str(e))
            error = ActionError(reason=problem.reason, message=problem.message)
            outcome = {"error": error.wire()}
        await self._patch(action, {"completedAt": now_precise(), **outcome})

    # --- blocking work -------------------------------------------------------------

    def _name(self, inst: Instance) -> str:
        return self.agent.domain_name(inst)

    def _in_place(self, inst: Instance, action: InstanceAction, plan: Plan) -> dict[str, Any]:
        kind = action.spec.action
        name = self._name(inst)
        if kind in ("SoftReboot", "HardReboot"):
            if self.libvirt.state(name) != DomainState.RUNNING:
                raise fail(
                    "InstanceNotRunning", f"instance {inst.name} is not running", retryable=False
                )
            # A rebooted guest starts afresh on its ports: only on bound ones.
            unbound = self.agent.unbound_ports(plan)
            if unbound:
                why = "; ".join(map(str, unbound)) + f": {kind} not done"
                raise fail("PortNotBound", why, retryable=False)
            self.libvirt.reboot(name, hard=kind == "HardReboot")
            return {"result": f"{kind} done"}
        if kind == "Snapshot":
            return self._snapshot(inst, action)
        if kind == "Rebuild":
            source = self._image_source(action.status.image)
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
            disk = self.agent.instance_dir(inst) / "disk"
            self.cache.delete_disk(str(disk))
            self.agent.overlay_disk(source, disk, plan.disk_bytes)
            return {"result": f"rebuilt from {action.status.image}"}
        if kind == "Rescue":
            source = self._image_source(action.status.image)
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
            rescue = self.agent.rescue_disk(inst)
            self.cache.delete_disk(str(rescue))
            self.agent.overlay_disk(source, rescue, None)
            return {"result": f"rescue disk from {action.status.image}"}
        if kind == "Unrescue":
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
            self.cache.delete_disk(str(self.agent.rescue_disk(inst)))
            return {"result": "booting from the root disk again"}
        if kind == "Resize":
            self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
            return {"result": f"resized to {action.status.flavor} on {self.agent.node}"}
        raise fail("UnsupportedAction", f"{kind} cannot run in place", retryable=False)

    def _image_source(self, key: str | None) -> ImageSource:
        image: Image | None = self.agent.op.store(Image).get(key or "")
        source = source_of(image, self.agent.store_dir) if image is not None else None
        if source is None:
            raise fail("ImageNotReady", f"image {key} is not imported into the image store")
        return source

    def _snapshot(self, inst: Instance, action: InstanceAction) -> dict[str, Any]:
        """Flatten the root disk; a running guest is paused meanwhile so the
        copy is consistent."""
        name = self._name(inst)
        was_running = self.libvirt.state(name) == DomainState.RUNNING
        if was_running:
            self.libvirt.pause(name)
        try:
            ref = internal_ref("snapshots", action.uid)
            target = Path(internal_path(str(self.agent.store_dir), ref))
            snap = self.cache.snapshot_disk(
                str(self.agent.instance_dir(inst) / "disk"), str(target), force_share=True
            )
            private_file(target)  # store files: the components' only
        finally:
            if was_running:
                self.libvirt.unpause(name)
        return {
            "transfer": {"ref": ref, "sha256": snap.sha256},
            "result": action.spec.image_name,
        }

    def _export(self, inst: Instance, action: InstanceAction) -> dict[str, str]:
        """Source side of a move: stop, then flatten the disk into the store."""
        name = self._name(inst)
        self.libvirt.shutdown(name, timeout=SHUTDOWN_TIMEOUT)
        ref = internal_ref("transfers", action.uid)
        target = internal_path(str(self.agent.store_dir), ref)
        snap = self.cache.snapshot_disk(str(self.agent.instance_dir(inst) / "disk"), target)
        private_file(target)  # store files: the components' only
        return {"ref": ref, "sha256": snap.sha256}

    def _import(self, inst: Instance, action: InstanceAction, plan: Plan) -> dict[str, Any]:
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
        return {"result": f"moved from {action.status.source_node} to {self.agent.node}"}
