"""Uninstall: the node agent removes what it made on its host.

`helm uninstall` deletes the agent DaemonSet, and a Pod's end takes nothing
of the host with it: the OVS bridges, DHCP servers and their namespaces, the
firewall chains and the state and run directories would stay. So the chart's
pre-delete hook (`nubes teardown-nodes`, runtime/teardown.py) puts a request
id in the nubes.io/teardown annotation of every Hypervisor and waits for each
live agent's answer in its Hypervisor's status.teardown:

- Blocked, and nothing is touched, while an object still uses the node (an
  Instance or Volume placed on it, a Port bound to it, a Network whose DHCP
  server or a Router it runs): an uninstall never cuts a running guest. The
  hook then withdraws its request and fails, naming the objects.
- Done once the agent has stopped every loop but its Hypervisor's (the
  Operator's quiesce) and removed its host state. It stays idle until the
  DaemonSet is gone; if the request is withdrawn instead (another node was
  blocked), the agent exits so that the kubelet restarts it and it rebuilds
  what it removed (its drivers made their directories at start).

Pure decisions here; the host work is one worker-thread function.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from nubes.agent.config import AgentConfig
from nubes.api.compute import Hypervisor, TeardownReport
from nubes.api.meta import Resource
from nubes.drivers.network.dhcp import DhcpServers
from nubes.drivers.network.firewall import Firewall
from nubes.drivers.network.firewall_rules import node_tag
from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs, OvsEndpoint
from nubes.drivers.network.router import Routers
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.runner import SubprocessRunner

if TYPE_CHECKING:
    from nubes.runtime.operator import Operator

log = structlog.get_logger()

ANNOTATION = "nubes.io/teardown"
"""On a Hypervisor: the id of an uninstall's teardown request."""

TIED = ("node", "host", "dhcp_node")
"""Status fields that tie an object to a node (placement, binding, DHCP)."""


def blocking(node: str, objects: Iterable[Resource[Any, Any]]) -> list[str]:
    """The objects that still use `node` ("Kind namespace/name"), sorted."""
    found = {
        f"{o.crd.kind} {o.key}"
        for o in objects
        if any(getattr(o.status, f, None) == node for f in TIED)
    }
    return sorted(found)


def answer(request: str, blockers: list[str]) -> TeardownReport | None:
    """Blocked naming (at most ten of) the blockers, or None: go ahead."""
    if not blockers:
        return None
    shown = ", ".join(blockers[:10]) + (
        f" and {len(blockers) - 10} more" if len(blockers) > 10 else ""
    )
    return TeardownReport(request=request, state="Blocked", message=f"still in use by {shown}")


def kept_dirs(config: AgentConfig) -> set[Path]:
    """Users' data that may live below the state directory: the image store
    and the backup store hold what Image and VolumeBackup objects (kept by an
    uninstall with the CRDs) refer to."""
    stores = [config.image_store, config.backup_store or os.path.join(config.state_dir, "backups")]
    return {Path(p).resolve() for p in stores}


def clear_dir(root: Path, keep: set[Path]) -> list[str]:
    """Remove what is below `root`, except non-empty kept directories (and
    the directories on the way to them)."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        path = child.resolve() if not child.is_symlink() else child
        inside = [k for k in keep if k == path or path in k.parents]
        if inside and child.is_dir() and not child.is_symlink():
            if path in keep:
                if any(path.iterdir()):
                    continue
            else:
                removed += clear_dir(child, keep)
                if any(child.iterdir()):
                    continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(str(child))
    return removed


class NodeTeardown:
    """Answers its Hypervisor's teardown request (from the Hypervisor
    reconciler, the one kept running while the agent is quiesced)."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.done: TeardownReport | None = None
        self.quiesced = False
        """Its loops are stopped: only a restart brings them back."""

    def _drivers(self) -> tuple[NodeSwitch, DhcpServers, Routers, Firewall, Links]:
        """Drivers of its own, in the thread that tears down (an OVSDB client
        is not shared across threads), over the names the loops use."""
        c = self.config
        runner = SubprocessRunner()
        links = Links(runner)
        switch = NodeSwitch(
            Ovs(runner, OvsEndpoint(c.ovs_db, c.ovs_rundir, c.node_netns)),
            datapath_type="netdev",  # only removes
            integration_bridge=c.integration_bridge,
            tunnel_bridge=c.tunnel_bridge,
            tunnel_ip=c.tunnel_ip,
            bridge_mappings=c.bridge_mappings,
        )
        dhcp = DhcpServers(
            runner,
            links,
            switch,
            state_dir=c.state_dir,
            netns_prefix=c.netns_prefix,
            node_netns=c.node_netns,
        )
        routers = Routers(runner, switch, netns_prefix=c.netns_prefix, node_netns=c.node_netns)
        return switch, dhcp, routers, Firewall(runner, node_tag(c.node)), links

    def setup(self, op: Operator) -> None:
        self.op = op

    async def status(self, hv: Hypervisor) -> dict[str, Any]:
        """status fields for this pass of the node's Hypervisor."""
        request = hv.metadata.annotations.get(ANNOTATION)
        if request is None:
            if self.quiesced:
                # Withdrawn after the loops stopped (another node was
                # blocked, or this removal kept failing): start afresh.
                log.warning("teardown withdrawn; restarting to rebuild the node")
                os.kill(os.getpid(), signal.SIGTERM)
            return {}
        if self.done is not None:
            return {"teardown": self.done.model_copy(update={"request": request}).wire()}
        blocked = answer(request, blocking(self.config.node, self._cached()))
        if blocked is not None:
            log.info("teardown blocked", request=request, message=blocked.message)
            return {"teardown": blocked.wire()}
        await self.op.quiesce(keep=[Hypervisor])
        self.quiesced = True
        late = answer(request, blocking(self.config.node, self._cached()))
        if late is not None:
            # Placed here while the loops still ran: resume by a restart.
            log.warning("teardown blocked late; restarting", message=late.message)
            os.kill(os.getpid(), signal.SIGTERM)
            return {"teardown": late.wire()}
        removed = await asyncio.to_thread(self.remove_host_state)
        self.done = TeardownReport(
            request=request, state="Done", message=f"removed {len(removed)} host objects"
        )
        log.info("torn down", request=request, removed=removed)
        return {"teardown": self.done.wire()}

    def _cached(self) -> list[Resource[Any, Any]]:
        """Every cached object but Hypervisors (the agent caches its node's)."""
        return [
            o for kind, store in self.op.stores.items() if kind is not Hypervisor for o in store
        ]

    def remove_host_state(self) -> list[str]:
        """Everything the agent made on the host, in dependency order."""
        removed: list[str] = []
        switch, dhcp, routers, firewall, links = self._drivers()
        for namespace in routers.namespaces():
            routers.remove(namespace)
            removed.append(namespace)
        for uid in dhcp.networks():
            dhcp.remove(uid)
            removed.append(f"dhcp {uid}")
        # A DHCP namespace whose state directory went missing (the names
        # drivers/network/dhcp.names_for gives).
        for namespace in Links.list_netns(f"{self.config.netns_prefix}-dhcp-"):
            links.delete_netns(namespace)
            removed.append(namespace)
        firewall.remove_all()
        removed.append("firewall")
        removed += switch.teardown()
        keep = kept_dirs(self.config)
        removed += clear_dir(Path(self.config.state_dir), keep)
        removed += clear_dir(Path(self.config.run_dir), keep)
        return removed
