"""Routing for a real QEMU guest (Tempest's network_basic_ops with a VM): a
libvirt guest behind a router on an L3 node reaches the external host
through SNAT (the host sees the router's gateway address), then, with a
floating IP, the external host reaches the guest's web server through it and
the guest's Instance status lists the floating address. The external host is
a namespace on the fabric where the flat external network goes, as in
test_routing.py."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nubes.api.compute import Instance
from nubes.api.image import Image
from nubes.api.network import FloatingIP, Router
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.echo import serve
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    NET,
    agent_of_the_node,
    condition,
    flavor,
    image,
    network,
    one_node_fabric,
    subnet,
    virsh,
    wait_console,
)
from tests.integration.test_routing import (
    EXT_CIDR,
    MAPPINGS,
    UPSTREAM,
    floating_ip,
    router,
    routers_removed,
)
from tests.nodes import Fabric, sh

USER_DATA = """#!/bin/sh
mkdir -p /www && echo "vm answers" > /www/index.html && httpd -p 80 -h /www
(
  for i in $(seq 90); do
    seen=$(nc -w 2 203.0.113.1 7000 </dev/null) && [ -n "$seen" ] && break
    sleep 1
  done
  echo "snat probe: $seen"
) &
"""


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    yield from one_node_fabric(tmp_path_factory, "r1")


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[Process]:
    yield from agent_of_the_node(
        fabric,
        tmp_path_factory,
        state_root=workdir,
        image_store=image_store,
        bridge_mappings=MAPPINGS,
        extra_args=("--l3", "--image-cache-grace", "0"),
    )


@pytest.fixture
async def upstream(fabric: Fabric) -> AsyncIterator[str]:
    netns = fabric.host("upstream", f"{UPSTREAM}/24")
    server = serve(netns, "upstream")
    yield netns
    server.kill()
    server.wait()


async def test_qemu_guest_routed_by_snat_and_floating_ip(
    kube: Kube,
    controller: Process,
    agent: Process,
    fabric: Fabric,
    upstream: str,
    namespace: str,
) -> None:
    ns, ext = namespace, f"ext-{uuid.uuid4().hex[:6]}"
    path = build_guest_image()
    image(ns, "guest", path, hashlib.sha256(path.read_bytes()).hexdigest())
    flavor_name = f"rt-{uuid.uuid4().hex[:6]}"
    flavor(flavor_name)
    kubectl("create", "namespace", ext)
    try:
        network(ext, "public", fabric, type="flat", physicalNetwork="physnet1", external=True)
        subnet(ext, "public-v4", "public", EXT_CIDR, gatewayIp=UPSTREAM, enableDhcp=False,
               allocationPools=[{"start": "203.0.113.50", "end": "203.0.113.60"}])  # fmt: skip
        network(ns, "net", fabric, type="vxlan")
        subnet(ns, "net-v4", "net", "10.32.0.0/24")
        router(ns, "r1", ["net-v4"], ext)
        apply({"apiVersion": NET, "kind": "SecurityGroup",
               "metadata": {"name": "web", "namespace": ns},
               "spec": {"rules": [{"protocol": "tcp", "portRangeMin": 80, "portRangeMax": 80,
                                   "remoteIpPrefix": "0.0.0.0/0"}]}})  # fmt: skip
        gateway = (await condition(kube, Router, "r1", ns, timeout=90)).status.gateway_ip
        await condition(kube, Image, "guest", ns, timeout=120)
        apply({"apiVersion": COMPUTE, "kind": "Instance",
               "metadata": {"name": "vm", "namespace": ns},
               "spec": {"availabilityZone": fabric.prefix, "flavor": flavor_name,
                        "image": {"name": "guest"}, "userData": USER_DATA,
                        "networks": [{"network": {"name": "net"}}],
                        "securityGroups": ["default", "web"]}})  # fmt: skip
        await condition(kube, Instance, "vm", ns, timeout=240)
        # Out through SNAT: the external host saw the router's gateway address.
        await wait_console(kube, "vm", ns, f"snat probe: upstream {gateway}", timeout=240)

        floating_ip(ns, "fip", ext, "vm-0")
        status = (await condition(kube, FloatingIP, "fip", ns, timeout=60)).status
        fip = status.floating_ip_address
        assert fip and status.router == "r1"

        def fetched() -> bool:
            out = sh("curl", "-fsS", "-m", "2", f"http://{fip}/", netns=upstream, check=False)
            return out.stdout.strip() == "vm answers"

        await eventually(fetched, timeout=30, what=f"the guest's page through {fip}")

        async def listed() -> bool:
            vm = await kube.get(Instance, "vm", ns)
            return vm is not None and vm.status.addresses[0].floating_ip_addresses == [fip]

        await eventually(listed, timeout=30, what="the floating IP in the Instance's status")
        # Disassociated: the address no longer leads to the guest.
        kubectl("patch", "floatingip", "fip", "-n", ns, "--type=json",
                "-p", '[{"op": "remove", "path": "/spec/port"}]')  # fmt: skip
        await eventually(lambda: not fetched(), timeout=30, what=f"{fip} disassociated")
    finally:
        kubectl("delete", "floatingips,routers", "--all", "-n", ns, "--wait=false", check=False)
        kubectl("delete", "instances", "--all", "-n", ns, "--wait=false", check=False)
        kubectl("delete", "flavor", flavor_name, "--ignore-not-found", "--wait=false", check=False)
    await routers_removed(kube, fabric, [ns])

    async def gone() -> bool:
        return not await kube.list(Instance, ns)

    await eventually(gone, timeout=180, what="instances deleted")
    leftover = [n for n in virsh("list", "--all", "--name").split() if n.startswith("nubes-")]
    assert not leftover, f"domains left behind: {leftover}"
    kubectl("delete", "ports,subnets,networks", "--all", "-n", ns, "--wait=false", check=False)
    kubectl("delete", "namespace", ext, "--wait=false", check=False)
