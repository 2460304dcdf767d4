"""The node agent: converges node-local state through the drivers."""

from __future__ import annotations

from typing import Any

from nubes.agent.config import AgentConfig
from nubes.api.compute import Instance, InstanceAction
from nubes.api.meta import Resource
from nubes.api.network import FloatingIP, Port, Router
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot
from nubes.runtime.informer import Selector
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
    cache_only_this_node(op, config.node)


NODE_FIELDS: dict[type[Resource[Any, Any]], tuple[str, ...]] = {
    # Bound here (the node's VIFs; a router's ports on its L3 node), or served
    # by this node's DHCP server (every port of such a network). Members of
    # remote security groups elsewhere come from the group's status.members.
    Port: ("status.host", "status.dhcpNode"),
    # Placed here, or arriving by a Migrate or Resize under way.
    Instance: ("status.node", "status.incomingNode"),
    # Every accepted action names its source node (a move also its target).
    InstanceAction: ("status.sourceNode", "status.targetNode"),
    # A volume's storage node, and the compute node it is attached to.
    Volume: ("status.node", "status.attachment.node"),
    # On their volume's storage node, where clones, restores and parent
    # backups are scheduled too.
    VolumeSnapshot: ("status.node",),
    VolumeBackup: ("status.node",),
    # The L3 node hosting the router, and the floating IPs it translates.
    Router: ("status.node",),
    FloatingIP: ("status.node",),
}
"""Per kind that grows with the cloud's guests, the fields naming the nodes
that need an object (selectable fields of its CRD). Kinds that grow with
projects and nodes (Network, Subnet, SecurityGroup, Hypervisor, Image) are
cached whole: a node needs ones no single field ties to it."""


def cache_only_this_node(op: Operator, node: str) -> None:
    """Watch the kinds of NODE_FIELDS through field selectors for `node`, so
    the agent's memory follows its node's share of the cloud. An object that
    leaves the node (a move, a DHCP or L3 failover, a new host) is a deletion
    here and an arrival there."""
    for kind, fields in NODE_FIELDS.items():
        if kind in op.stores:
            op.select(kind, *(Selector(field=f"{f}={node}") for f in fields))
