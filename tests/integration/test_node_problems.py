"""Node-side failures of an Instance reach the Instance: the node agent
reports them in status.nodeProblem (typed: reason, message, retryable,
node) and the controller shows that reason in the conditions, instead of
the agent logging and retrying while the user sees PowerStateConverging.

The failure is made for real: the image's copy in the image store vanishes
after the import, so the node cannot build the root disk. Once the copy is
back, the agent's retry boots the guest and the problem is cleared."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.compute import Instance
from nubes.api.image import Image
from nubes.drivers.compute.libvirt import DomainState
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    agent_of_the_node,
    condition,
    domain_state,
    flavor,
    image,
    node_name,
    one_node_fabric,
    virsh,
)
from tests.nodes import Fabric


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    yield from one_node_fabric(tmp_path_factory, "p1")


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[Process]:
    # No grace for unused cached images: nothing of the test stays in the cache.
    yield from agent_of_the_node(
        fabric,
        tmp_path_factory,
        state_root=workdir,
        image_store=image_store,
        extra_args=("--image-cache-grace", "0"),
    )


async def test_a_vanished_image_shows_on_the_instance(
    kube: Kube,
    controller: Process,
    agent: Process,
    fabric: Fabric,
    namespace: str,
    image_store: Path,
    workdir: Path,
) -> None:
    ns, node = namespace, node_name(fabric, fabric.nodes[0])
    path = build_guest_image()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    flavor_name = f"tiny-{uuid.uuid4().hex[:6]}"
    flavor(flavor_name)
    vm: Instance | None = None
    try:
        image(ns, "guest", path, sha)
        img = await condition(kube, Image, "guest", ns, timeout=120)
        stored = image_store / img.uid
        assert stored.is_file()
        stored.unlink()  # the store copy is gone; the Image still says Ready

        apply(
            {
                "apiVersion": COMPUTE,
                "kind": "Instance",
                "metadata": {"name": "vm", "namespace": ns},
                "spec": {
                    "availabilityZone": fabric.prefix,
                    "flavor": flavor_name,
                    "image": {"name": "guest"},
                },
            }
        )

        async def reported() -> Instance | None:
            vm = await kube.get(Instance, "vm", ns)
            ready = vm.status.condition("Ready") if vm is not None else None
            return vm if ready is not None and ready.reason == "ImageFetchFailed" else None

        vm = await eventually(reported, timeout=60, what="ImageFetchFailed on the instance")
        problem = vm.status.node_problem
        assert problem is not None and problem.node == node and problem.retryable
        assert problem.reason == "ImageFetchFailed" and "instance vm" in problem.message
        ready, reconciling = vm.status.condition("Ready"), vm.status.condition("Reconciling")
        assert ready is not None and ready.status == "False"
        assert f"node {node}: instance vm: " in ready.message, ready.message
        assert reconciling is not None and reconciling.status == "True"
        assert reconciling.reason == "ImageFetchFailed"
        assert vm.status.power_state == "Absent"

        # The copy comes back: the agent's retry boots the guest, the
        # problem is cleared and the instance is Ready.
        shutil.copyfile(path, stored)
        stored.chmod(0o600)

        async def recovered() -> Instance | None:
            got = await kube.get(Instance, "vm", ns)
            ok = got is not None and got.status.is_true("Ready")
            return got if ok and got.status.node_problem is None else None

        vm = await eventually(recovered, timeout=180, what="instance Ready after the fix")
        assert vm.status.power_state == "Running"
        assert domain_state(vm.status.domain) == DomainState.RUNNING
    finally:
        kubectl("delete", "instances", "--all", "-n", ns, "--wait=false", check=False)

        async def gone() -> bool:
            return not await kube.list(Instance, ns)

        await eventually(gone, timeout=120, what="instances deleted")
        kubectl("delete", "images", "--all", "-n", ns, "--wait=false", check=False)
        kubectl("delete", "flavor", flavor_name, "--ignore-not-found", "--wait=false")
    leftover = [n for n in virsh("list", "--all", "--name").split() if vm_domain(n, vm)]
    assert not leftover, f"domains left behind: {leftover}"
    instances = workdir / f"agent-{fabric.nodes[0].name}" / "instances"
    assert [p.name for p in instances.glob("*") if p.name != "_base"] == []
    cached = [p.name for p in (instances / "_base").glob("*") if not p.name.startswith(".")]
    assert not cached, f"unused cached images: {cached}"


def vm_domain(name: str, vm: Any) -> bool:
    return bool(vm is not None and vm.uid in name)
