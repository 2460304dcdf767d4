"""Building blocks for end-to-end tests: node agents on simulated nodes, and
short ways to apply and wait for Nubes objects."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.drivers.compute.libvirt import DomainState, LibvirtCompute
from nubes.drivers.network.netns import Links
from nubes.drivers.network.ovs import Ovs
from nubes.drivers.network.switch import NodeSwitch
from nubes.drivers.network.vif import VifPlugger
from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import CONFIGMAPS, Kube
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.conftest import start_process
from tests.integration.identity import agent_env
from tests.nodes import Fabric, SimNode, sh

NET = "network.nubes.io/v1alpha1"
COMPUTE = "compute.nubes.io/v1alpha1"
IMAGE = "image.nubes.io/v1alpha1"


def node_name(fabric: Fabric, node: SimNode) -> str:
    return fabric.node_name(node)


def start_agent(
    fabric: Fabric,
    node: SimNode,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    state_root: Path | None = None,
    image_store: Path | None = None,
    bridge_mappings: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    node_identity: bool = True,
) -> Process:
    """A node agent for a simulated node: its own OVS, namespaces and state.
    It acts as the chart's nubes-agent ServiceAccount with a token bound to
    its node (as in a DaemonSet pod), so the agent role and the
    nubes-agent-node admission policy apply to everything it writes;
    `node_identity=False` runs it with the admin credentials instead."""
    state = (state_root or fabric.root) / f"agent-{node.name}"
    state.mkdir(parents=True, exist_ok=True, mode=0o755)
    args = fabric.agent_argv(node, state)
    if image_store is not None:
        args += ["--image-store", str(image_store)]
    for mapping in bridge_mappings:
        args += ["--bridge-mapping", mapping]
    args += extra_args
    env = (
        agent_env(tmp_path_factory.mktemp("tokens"), node_name(fabric, node))
        if node_identity
        else {}
    )
    return start_process(tmp_path_factory, f"agent-{node.name}", *args, env=env)


def one_node_fabric(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Fabric]:
    """A module's simulated node (the body of its `fabric` fixture)."""
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), [name])
    yield fab
    fab.stop()


def agent_of_the_node(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, **options: Any
) -> Iterator[Process]:
    """The agent of a one-node fabric (the body of an `agent` fixture): its
    Hypervisor goes with it, and it must not have crashed meanwhile."""
    node = fabric.nodes[0]
    proc = start_agent(fabric, node, tmp_path_factory, **options)
    try:
        yield proc
    finally:
        proc.stop()
        kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")
    proc.assert_no_crash()


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


def flavor(name: str, **spec: Any) -> None:
    apply(
        {
            "apiVersion": COMPUTE,
            "kind": "Flavor",
            "metadata": {"name": name},
            "spec": {"vcpus": 1, "ramMib": 256, "diskGib": 1, **spec},
        }
    )


def importable(path: Path) -> Path:
    """`path`, or a copy of it below the controller's import directory (the
    only place file:// sources may read from)."""
    root = Path(os.environ["NUBES_TEST_IMPORT_DIR"])
    if path.resolve().is_relative_to(root):
        return path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = root / "import" / f"{digest}-{path.name}"
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
    return target


def image(ns: str, name: str, path: Path, sha256: str | None, fmt: str = "qcow2") -> None:
    """An Image from a file (applied as the cluster admin: file:// is admin-only)."""
    spec: dict[str, Any] = {"source": {"url": importable(path).as_uri()}, "diskFormat": fmt}
    if sha256:
        spec["sha256"] = sha256
    apply(
        {
            "apiVersion": IMAGE,
            "kind": "Image",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


async def console(kube: Kube, inst: str, ns: str) -> str:
    cm = await kube.get_raw(CONFIGMAPS, f"{inst}-console", ns)
    return str((cm or {}).get("data", {}).get("console.log", ""))


def said(log: str, line: str) -> int:
    """How many console lines are exactly `line` (user data echoes its own
    script, so a substring test would find the script's text)."""
    return sum(1 for entry in log.replace("\r", "").splitlines() if entry.strip() == line)


async def wait_console(
    kube: Kube,
    inst: str,
    ns: str,
    text: str,
    timeout: float = 120,
    *,
    line: bool = False,
    times: int = 1,
) -> str:
    """Wait for `text` on the console; with `line`, for whole lines equal to it."""

    async def probe() -> str | None:
        log = await console(kube, inst, ns)
        found = said(log, text) if line else log.count(text)
        return log if found >= times else None

    try:
        return await eventually(
            probe, timeout=timeout, interval=1, what=f"{text!r} on {inst}'s console"
        )
    except AssertionError as e:
        ports = kubectl("get", "ports", "-n", ns, "-o", "yaml").stdout
        raise AssertionError(
            f"{e}\nconsole:\n{await console(kube, inst, ns)}\nports:\n{ports}"
        ) from None


def domain_state(name: str | None) -> DomainState:
    if name is None:
        return DomainState.ABSENT
    compute = LibvirtCompute()
    try:
        return compute.state(name)
    finally:
        compute.close()


MARKER_SCRIPT = """#!/bin/sh
# A marker on the root disk, past the boot partition: written on the first
# boot, found on every boot after (and in snapshots, moves and unshelves).
m=$(dd if=/dev/vda bs=1M skip=900 count=1 2>/dev/null | head -c 10)
if [ "$m" = MARKER-ONE ]; then echo marker-found; else
  echo MARKER-ONE > /tmp/m; dd if=/tmp/m of=/dev/vda bs=1M seek=900 conv=notrunc 2>/dev/null
  sync; echo marker-written; fi
"""


def virsh(*args: str) -> str:
    return sh("virsh", "-c", "qemu:///system", *args).stdout


def iscsi_secrets(instance_uid: str) -> list[str]:
    """Usages of the libvirt CHAP secrets held for an instance's volumes."""
    return [
        line.split()[-1]
        for line in virsh("secret-list").splitlines()
        if " iscsi " in line and instance_uid in line
    ]
