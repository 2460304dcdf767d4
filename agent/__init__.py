"""The node agent: converges node-local state through the drivers."""

from __future__ import annotations

from nubes.agent.config import AgentConfig
from nubes.runtime.operator import Operator


async def build_agent(op: Operator, config: AgentConfig) -> None:
    from nubes.agent.compute import InstanceAgent
    from nubes.agent.hypervisor import HypervisorReporter
    from nubes.agent.network import NodeNetworking
    from nubes.agent.storage import NodeStorage

    storage = NodeStorage(config)
    op.register(HypervisorReporter(config, reports=[storage.report]))
    storage.register(op)
    networking = NodeNetworking(config)
    networking.register(op)
    op.register(InstanceAgent(config, networking))
    if config.l3:
        from nubes.agent.l3 import NodeRouters

        NodeRouters(config, networking).register(op)
