"""Security groups on a real QEMU guest: the instance's tap (libvirt's, on
its qbr) is filtered like the namespace guests of test_security_groups.py.
The guest gets its lease through the firewall, a member of its `default`
group reaches it, a port outside the group does not until a rule naming its
address is added to the running guest's group."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nubes.api.compute import Instance
from nubes.api.image import Image
from nubes.api.network import Port, SecurityGroup
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    NET,
    agent_of_the_node,
    condition,
    flavor,
    image,
    network,
    node_name,
    one_node_fabric,
    plugger,
    port,
    subnet,
    virsh,
    wait_console,
)
from tests.nodes import Fabric, ping, sh


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    yield from one_node_fabric(tmp_path_factory, "q1")


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[Process]:
    yield from agent_of_the_node(
        fabric,
        tmp_path_factory,
        state_root=workdir,
        image_store=image_store,
        extra_args=("--image-cache-grace", "0"),
    )


@pytest.fixture
async def cleanup(kube: Kube, namespace: str, agent: Process) -> AsyncIterator[None]:
    yield
    kubectl("delete", "instances", "--all", "-n", namespace, "--wait=false", check=False)

    async def gone() -> bool:
        return not await kube.list(Instance, namespace)

    await eventually(gone, timeout=180, what="instances deleted")
    leftover = [n for n in virsh("list", "--all", "--name").split() if n.startswith("nubes-")]
    assert not leftover, f"domains left behind: {leftover}"


async def test_qemu_guest_is_filtered_by_its_groups(
    kube: Kube,
    controller: Process,
    agent: Process,
    fabric: Fabric,
    namespace: str,
    cleanup: None,
) -> None:
    ns = namespace
    node = fabric.nodes[0]
    host = node_name(fabric, node)
    path = build_guest_image()
    image(ns, "guest", path, hashlib.sha256(path.read_bytes()).hexdigest())
    await condition(kube, Image, "guest", ns, timeout=120)
    flavor_name = f"sg-{uuid.uuid4().hex[:6]}"
    flavor(flavor_name)
    guests: list[tuple[str, str]] = []
    try:
        network(ns, "net", fabric, type="vxlan")
        subnet(ns, "net-v4", "net", "10.31.0.0/24")
        apply(
            {
                "apiVersion": COMPUTE,
                "kind": "Instance",
                "metadata": {"name": "vm", "namespace": ns},
                "spec": {
                    "availabilityZone": fabric.prefix,
                    "flavor": flavor_name,
                    "image": {"name": "guest"},
                    "networks": [{"network": {"name": "net"}}],
                },
            }
        )
        vm = await condition(kube, Instance, "vm", ns, timeout=240)
        ip = vm.status.addresses[0].ip_addresses[0]
        # DHCP went through the guest's firewall (udp 67->68 in, 68->67 out).
        await wait_console(kube, "vm", ns, f"lease eth0 ip={ip}/24", timeout=180)

        # A member of default, and a port in a group of its own.
        apply(
            {
                "apiVersion": NET,
                "kind": "SecurityGroup",
                "metadata": {"name": "outsider", "namespace": ns},
                "spec": {"rules": [{"direction": "egress"}]},
            }
        )
        probes = {}
        for name, ip_, groups in (
            ("member", "10.31.0.201", None),
            ("stranger", "10.31.0.202", ["outsider"]),
        ):
            extra = {"securityGroups": groups} if groups is not None else {}
            port(ns, name, "net", host, fixedIps=[{"ipAddress": ip_}], **extra)
            p = await condition(kube, Port, name, ns, type_="Reconciling", timeout=60)
            netns = fabric.guest(f"{name}{uuid.uuid4().hex[:3]}")
            # pyroute2 (the drivers' netlink) must not run on the event loop's thread.
            await asyncio.to_thread(
                plugger(node).plug_netns,
                p.uid,
                p.status.mac_address or "",
                p.status.mtu or 1500,
                netns,
            )
            guests.append((p.uid, netns))
            sh("ip", "-n", netns, "addr", "add", f"{ip_}/24", "dev", "eth0")
            await condition(kube, Port, name, ns, timeout=60)
            probes[name] = netns

        await eventually(
            lambda: ping(probes["member"], ip),
            timeout=30,
            what="a member of default reaches the VM",
        )
        assert not ping(probes["stranger"], ip, count=1), "outside default: dropped"
        # A rule for the stranger's address, added to the running guest's group.
        sg = await kube.get(SecurityGroup, "default", ns)
        assert sg is not None
        rules = [r.wire() for r in sg.spec.rules]
        rules.append(
            {"direction": "ingress", "protocol": "icmp", "remoteIpPrefix": "10.31.0.202/32"}
        )
        apply(
            {
                "apiVersion": NET,
                "kind": "SecurityGroup",
                "metadata": {"name": "default", "namespace": ns},
                "spec": {"rules": rules},
            }
        )
        await eventually(
            lambda: ping(probes["stranger"], ip, count=1), timeout=20, what="the new rule in force"
        )
    finally:
        for uid, _ in guests:
            await asyncio.to_thread(plugger(node).unplug, uid)
        kubectl("delete", "instances", "--all", "-n", ns, "--wait=false", check=False)
        kubectl("delete", "flavor", flavor_name, "--ignore-not-found", "--wait=false", check=False)
