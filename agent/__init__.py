"""The node agent: converges node-local state through the drivers."""

from __future__ import annotations

from typing import Any

from nubes.agent.config import AgentConfig
from nubes.api.compute import Instance, InstanceAction
from nubes.api.meta import Resource
from nubes.api.network import FloatingIP, Port, Router
from nubes.api.nodes import node_selector
from nubes.api.storage import Volume, VolumeBackup, VolumeSnapshot
from nubes.runtime.informer import Selector
from nubes.runtime.operator import Operator

NODE_KINDS: tuple[type[Resource[Any, Any]], ...] = (
    Port,
    Instance,
    InstanceAction,
    Volume,
    VolumeSnapshot,
    VolumeBackup,
    Router,
    FloatingIP,
)
"""Kinds an agent caches only where labelled for its node."""


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
    if config.cache_only_node:
        cache_only_this_node(op, config.node)


def cache_only_this_node(op: Operator, node: str) -> None:
    """Cache the kinds that grow with the cloud's guests only where they are
    labelled for this node (see nubes.api.nodes; the controller keeps the
    labels). Per kind, what the node needs of it and why the label covers it:

    - Port: bound here (status.host: the node's VIFs, and a router's ports on
      its L3 node) or served by this node's DHCP server (status.dhcpNode: the
      network's every port). Members of remote security groups on other
      nodes come from the group's status.members, not from Ports.
    - Instance: placed here, or source or target of a move under way.
    - InstanceAction: its source or target node.
    - Volume: its storage node, or the compute node it is attached to.
    - VolumeSnapshot, VolumeBackup: the storage node (a restore or a parent
      backup is on the node holding the backup; a clone or snapshot stays
      in its volume's pool).
    - Router, FloatingIP: the L3 node hosting the router.

    Not narrowed, because they grow with projects and nodes, not with guests,
    and the node needs ones no single field ties to it: Network and Subnet
    (every network with a port or DHCP server here), SecurityGroup (the
    groups of the local ports' projects, and their remote groups),
    Hypervisor (tunnel peers, iSCSI initiators), Image (volume sources).
    """
    selector = Selector(label=node_selector(node))
    for kind in NODE_KINDS:
        if kind in op.stores:
            op.select(kind, selector)
