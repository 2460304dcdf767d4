"""Registers this node as a Hypervisor and heartbeats what it observes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from nubes.agent.config import AgentConfig
from nubes.agent.teardown import NodeTeardown
from nubes.api.compute import Hypervisor, HypervisorSpec, Instance
from nubes.api.meta import ObjectMeta, now_rfc3339, seconds_since
from nubes.drivers import host
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler

log = structlog.get_logger()

HEARTBEAT_SECONDS = 20.0


class HypervisorReporter(Reconciler[Hypervisor]):
    kind = Hypervisor
    workers = 1

    def __init__(
        self,
        config: AgentConfig,
        reports: Sequence[Callable[[], dict[str, Any]]] = (),
        teardown: NodeTeardown | None = None,
    ):
        # The teardown builds its own drivers from the configuration, so
        # the agent's wiring (agent/__init__.py) does not change for it.
        self.config = config
        self.reports = reports
        """Other facts of this node (storage pools), each a cheap cached read."""
        self.teardown = teardown or NodeTeardown(config)
        """Answers an uninstall's teardown request (agent/teardown.py)."""
        self.runner = SubprocessRunner()
        self._facts: dict[str, Any] | None = None

    def setup(self, op: Operator) -> None:
        super().setup(op)
        op.on_start(self.register)
        self.teardown.setup(op)
        op.watch(
            Instance,
            Hypervisor,
            lambda i: [self.config.node],
            when=lambda old, new: _usage_facts(old) != _usage_facts(new),
        )

    def accepts(self, obj: Hypervisor) -> bool:
        return obj.name == self.config.node

    async def register(self) -> None:
        """Create this node's Hypervisor on first start; operators own its spec."""
        if self.op.store(Hypervisor).lookup(self.config.node) is not None:
            return
        obj = Hypervisor(
            metadata=ObjectMeta(name=self.config.node),
            spec=HypervisorSpec(availability_zone=self.config.availability_zone),
        )
        try:
            await self.op.kube.create(obj)
            log.info("registered hypervisor", node=self.config.node)
        except ApiError as e:
            if not e.conflict:
                raise

    async def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = await asyncio.to_thread(self._static_facts)
        return self._facts

    def _static_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "hypervisorType": "QEMU",
            "vcpus": host.cpu_count(),
            "ramMib": host.memory_mib(),
            "diskGib": host.disk_gib(self.config.state_dir),
        }
        try:
            facts["hypervisorVersion"] = host.qemu_version(self.runner)
            facts["virtType"] = (
                host.detect_virt_type(self.runner, self.config.state_dir)
                if self.config.virt_type == "auto"
                else self.config.virt_type
            )
        except (OSError, Exception) as e:  # no QEMU on this node: not a compute node
            log.warning("no hypervisor found", error=str(e))
        if self.config.tunnel_ip:
            facts["hostIp"] = self.config.tunnel_ip
        facts["l3Agent"] = self.config.l3
        return facts

    def usage(self) -> dict[str, int]:
        """What the instances placed here use (the controller's placement,
        the agent's observed power state)."""
        here = [i for i in self.op.store(Instance) if i.status.node == self.config.node]
        return {
            "vcpusUsed": sum(i.status.vcpus or 0 for i in here),
            "ramMibUsed": sum(i.status.ram_mib or 0 for i in here),
            "diskGibUsed": sum(i.status.disk_gib or 0 for i in here),
            "runningVms": sum(1 for i in here if i.status.power_state == "Running"),
        }

    async def converge(self, obj: Hypervisor) -> Outcome:
        status = dict(await self.facts())
        for report in self.reports:
            status.update(report())
        status.update(self.usage())
        status.update(await self.teardown.status(obj))
        # Beat only when the last beat is due: every status write comes back
        # as a watch event and would otherwise beat again at once.
        age = seconds_since(obj.status.heartbeat_time)
        if age is not None and age < HEARTBEAT_SECONDS:
            status["heartbeatTime"] = obj.status.heartbeat_time
            return Outcome.observed(status, requeue_after=HEARTBEAT_SECONDS - age)
        status["heartbeatTime"] = now_rfc3339()
        return Outcome.observed(status, requeue_after=HEARTBEAT_SECONDS)


def _usage_facts(inst: Instance | None) -> tuple[object, ...] | None:
    if inst is None:
        return None
    s = inst.status
    return (s.node, s.vcpus, s.ram_mib, s.disk_gib, s.power_state)
