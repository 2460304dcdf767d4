"""Building blocks for end-to-end tests: node agents on simulated nodes, and
short ways to apply and wait for Nubes objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import Kube
from tests.helpers import Process, apply, eventually
from tests.integration.conftest import start_process
from tests.nodes import Fabric, SimNode

NET = "network.nubes.io/v1alpha1"
COMPUTE = "compute.nubes.io/v1alpha1"
IMAGE = "image.nubes.io/v1alpha1"


def node_name(fabric: Fabric, node: SimNode) -> str:
    return f"{fabric.prefix}-{node.name}"


def start_agent(
    fabric: Fabric,
    node: SimNode,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    state_root: Path | None = None,
    image_store: Path | None = None,
) -> Process:
    """A node agent for a simulated node: its own OVS, namespaces and state."""
    state = (state_root or fabric.root) / f"agent-{node.name}"
    state.mkdir(parents=True, exist_ok=True, mode=0o755)
    args = [
        "agent",
        "--node",
        node_name(fabric, node),
        "--state-dir",
        str(state),
        "--run-dir",
        str(state / "run"),
        "--ovs-db",
        node.endpoint.db,
        "--ovs-rundir",
        str(node.rundir),
        "--node-netns",
        node.netns,
        "--netns-prefix",
        f"{fabric.prefix}{node.name}",
        "--tunnel-ip",
        node.tunnel_ip,
        "--availability-zone",
        fabric.prefix,
        "--virt-type",
        "qemu",
    ]
    if image_store is not None:
        args += ["--image-store", str(image_store)]
    return start_process(tmp_path_factory, f"agent-{node.name}", *args)


def plugger(node: SimNode) -> VifPlugger:
    """What a compute node does to plug a NIC, for namespace guests."""
    run = SubprocessRunner()
    switch = NodeSwitch(Ovs(run, node.endpoint), datapath_type="netdev")
    return VifPlugger(Links(run), switch, node.netns)


def network(ns: str, name: str, fabric: Fabric, **spec: Any) -> None:
    apply(
        {
            "apiVersion": NET,
            "kind": "Network",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"availabilityZoneHints": [fabric.prefix], **spec},
        }
    )


def subnet(ns: str, name: str, net: str, cidr: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": NET,
            "kind": "Subnet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"network": {"name": net}, "cidr": cidr, **spec},
        }
    )


def port(ns: str, name: str, net: str, host: str | None = None, **spec: Any) -> None:
    body: dict[str, Any] = {"network": {"name": net}, **spec}
    if host:
        body["binding"] = {"host": host}
    apply(
        {
            "apiVersion": NET,
            "kind": "Port",
            "metadata": {"name": name, "namespace": ns},
            "spec": body,
        }
    )


async def condition(
    kube: Kube,
    kind: type[Any],
    name: str,
    ns: str | None,
    type_: str = "Ready",
    status: str = "True",
    timeout: float = 60,
) -> Any:
    """The object once condition `type_` has `status`."""

    async def probe() -> Any:
        obj = await kube.get(kind, name, ns)
        if obj is None:
            return None
        cond = obj.status.condition(type_)
        return obj if cond is not None and cond.status == status else None

    return await eventually(
        probe, timeout=timeout, what=f"{kind.crd.kind} {ns}/{name} {type_}={status}"
    )
