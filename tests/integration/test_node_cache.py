"""A node agent caches only the objects of its node: its informers (wired as
`nubes agent` wires them) list and watch Ports through the CRD's selectable
fields (status.host, status.dhcpNode) for their node. A port whose host
changes leaves the old node's cache (a deletion there) and arrives in the new
node's; other nodes' ports and unbound ones never come in."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from nubes.agent import cache_only_this_node
from nubes.api.network import Network, Port, Subnet
from nubes.runtime.kube import Kube, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.store import Store
from tests.helpers import Process, eventually

NET = "network.nubes.io/v1alpha1"


class AgentPortCache:
    """The Port store of an agent for `node`, fed as the agent feeds it."""

    def __init__(self, kube: Kube, node: str):
        self.op = Operator(f"agent-{node}", kube)
        self.store: Store[Port] = self.op.store(Port)
        cache_only_this_node(self.op, node)
        self.left: list[str] = []
        self.store.add_listener(self._on_change)
        self.tasks: list[asyncio.Task[None]] = []

    def _on_change(self, old: Port | None, new: Port | None) -> None:
        if new is None and old is not None:
            self.left.append(old.name)

    async def start(self) -> None:
        await self.op._initial_sync()
        self.tasks = [asyncio.create_task(i.run()) for i in self.op.informers]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def names(self) -> list[str]:
        return sorted(p.name for p in self.store)


def port_body(ns: str, name: str, host: str | None) -> dict[str, object]:
    spec: dict[str, object] = {"network": {"name": "net"}}
    if host:
        spec["binding"] = {"host": host}
    return {
        "apiVersion": NET,
        "kind": "Port",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


async def test_an_agent_caches_only_the_ports_of_its_node(
    kube: Kube, controller: Process, namespace: str
) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b = f"cache-a-{tag}", f"cache-b-{tag}"
    ns = namespace
    await kube.create_raw(
        path_of(Network),
        {
            "apiVersion": NET,
            "kind": "Network",
            "metadata": {"name": "net", "namespace": ns},
            "spec": {"type": "vxlan"},
        },
        ns,
    )
    await kube.create_raw(
        path_of(Subnet),
        {
            "apiVersion": NET,
            "kind": "Subnet",
            "metadata": {"name": "net-v4", "namespace": ns},
            "spec": {"network": {"name": "net"}, "cidr": "10.77.0.0/24", "enableDhcp": False},
        },
        ns,
    )
    hosts = {"a1": a, "a2": a, "b1": b, "free": None}
    for name, host in hosts.items():
        await kube.create_raw(path_of(Port), port_body(ns, name, host), ns)

    async def placed() -> str | None:
        ports = {p.name: p for p in await kube.list(Port, ns)}
        if len(ports) != len(hosts):
            return None
        return "placed" if all(ports[n].status.host == h for n, h in hosts.items()) else None

    await eventually(placed, timeout=60, what="ports placed on their hosts")

    on_a, on_b = AgentPortCache(kube, a), AgentPortCache(kube, b)
    await on_a.start()
    await on_b.start()
    try:
        # Listed through the selectors: the other node's ports, the unbound
        # port and every other port of the cluster stay out.
        assert on_a.names() == ["a1", "a2"]
        assert on_b.names() == ["b1"]

        # a2 moves to node b: a sees it leave (a deletion), b sees it come.
        await kube.patch_raw(path_of(Port), "a2", {"spec": {"binding": {"host": b}}}, ns)
        await eventually(
            lambda: on_a.names() == ["a1"] and on_b.names() == ["a2", "b1"],
            timeout=30,
            what="port a2 moved from node a's cache to node b's",
        )
        assert on_a.left == ["a2"]
        moved = on_b.store.lookup("a2", ns)
        assert moved is not None and moved.status.host == b

        # A deleted port leaves the cache of its node only.
        await kube.delete_raw(path_of(Port), "b1", ns)
        await eventually(lambda: on_b.names() == ["a2"], timeout=60, what="b1 deleted")
        assert on_a.names() == ["a1"]
        assert on_a.left == ["a2"]
    finally:
        await on_a.stop()
        await on_b.stop()
