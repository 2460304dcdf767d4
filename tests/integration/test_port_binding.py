"""A new NIC is isolated until its port is bound on its node, end to end:
the controller, one node agent (its own OVS), dnsmasq, a namespace guest and
a libvirt guest. Ports are kept from binding by binding them (as an admin)
to a node that does not exist, then bound to the real node."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.api.compute import Instance
from nubes.api.network import Network, Port
from nubes.drivers.compute.libvirt import DomainState
from nubes.drivers.network.switch import is_isolated
from nubes.runtime.kube import Kube
from tests.drivers.guest import build_guest_image
from tests.helpers import Process, apply, eventually, kubectl
from tests.integration.cloud import (
    COMPUTE,
    condition,
    domain_state,
    flavor,
    image,
    network,
    node_name,
    plugger,
    port,
    start_agent,
    subnet,
    wait_console,
)
from tests.nodes import Fabric, dhcp_lease

TIMEOUT = 3  # the agent's port binding timeout in this module, seconds


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    fab = Fabric.start(tmp_path_factory.mktemp("fabric"), ["b1"])
    yield fab
    fab.stop()


@pytest.fixture(scope="module")
def agent(
    fabric: Fabric, tmp_path_factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Iterator[dict[str, Process]]:
    """The node's agent, in a dict so that a test can restart it."""
    node = fabric.nodes[0]
    procs = {"agent": _start(fabric, tmp_path_factory, workdir, image_store)}
    try:
        yield procs
    finally:
        procs["agent"].stop()
        kubectl("delete", "hypervisor", node_name(fabric, node), "--ignore-not-found")
    procs["agent"].assert_no_crash()


def _start(
    fabric: Fabric, factory: pytest.TempPathFactory, workdir: Path, image_store: Path
) -> Process:
    return start_agent(
        fabric,
        fabric.nodes[0],
        factory,
        state_root=workdir,
        image_store=image_store,
        extra_args=("--port-binding-timeout", str(TIMEOUT)),
    )


def bind_to(ns: str, name: str, host: str) -> None:
    patch = {"spec": {"binding": {"host": host}}}
    kubectl("patch", "port", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


async def port_on(kube: Kube, ns: str, name: str, host: str) -> Port:
    async def probe() -> Port | None:
        p = await kube.get(Port, name, ns)
        return p if p and p.status.host == host and p.status.mac_address else None

    result: Port = await eventually(probe, timeout=60, what=f"port {name} bound to {host}")
    return result


async def test_a_vif_passes_no_traffic_until_its_port_is_bound_here(
    kube: Kube,
    controller: Process,
    agent: dict[str, Process],
    fabric: Fabric,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    workdir: Path,
    image_store: Path,
) -> None:
    ns, node = namespace, fabric.nodes[0]
    here, nowhere = node_name(fabric, node), f"{fabric.prefix}-nowhere"
    network(ns, "net", fabric, type="vxlan")
    subnet(ns, "net-v4", "net", "10.41.0.0/24")
    port(ns, "p", "net", nowhere, fixedIps=[{"ipAddress": "10.41.0.10"}])
    net = await condition(kube, Network, "net", ns)
    assert net.status.dhcp_node == here
    p = await port_on(kube, ns, "p", nowhere)
    # The DHCP server knows the port: only the binding keeps it from a lease.
    await eventually(
        lambda: _dhcp_served(kube, ns, "p"), timeout=60, what="port p in the DHCP server"
    )

    guest = fabric.guest("p")
    vifs = plugger(node)
    vifs.plug_netns(p.uid, p.status.mac_address or "", p.status.mtu or 1500, guest)
    assert is_isolated(vifs.switch.vif_ports()[p.uid]), "plugged isolated"
    assert dhcp_lease(guest, timeout=4) == {}, "an unbound port must get no lease"
    assert is_isolated(vifs.switch.vif_ports()[p.uid]), "the agent kept it isolated"

    bind_to(ns, "p", here)
    bound = await condition(kube, Port, "p", ns, timeout=60)
    assert bound.status.binding and bound.status.binding.active
    assert dhcp_lease(guest).get("ip") == "10.41.0.10", "bound: on its network"

    # Unbound while the agent is down, a VIF of a Port that no longer
    # exists with a network's tag, and an untagged VIF (a crash, or an older
    # agent): the restarted agent isolates all of them, and tags none.
    agent["agent"].stop()
    agent["agent"].assert_no_crash()
    bind_to(ns, "p", nowhere)
    vlan = bound.status.binding.local_vlan
    assert vlan is not None
    ghost, bare = fabric.guest("ghost"), fabric.guest("bare")
    ghost_uid, bare_uid = str(uuid.uuid4()), str(uuid.uuid4())
    vifs.plug_netns(ghost_uid, "fa:16:3e:41:00:01", 1450, ghost)
    vifs.plug_netns(bare_uid, "fa:16:3e:41:00:02", 1450, bare)
    vifs.switch.bind(vifs.switch.vif_ports()[ghost_uid], vlan)
    vifs.switch.ovs.set_port(
        vifs.switch.vif_ports()[bare_uid].name, {}, ("tag", "trunks", "vlan_mode")
    )
    assert vifs.switch.vif_ports()[p.uid].tag == vlan, "the agent is down: nothing changed yet"
    agent["agent"] = _start(fabric, tmp_path_factory, workdir, image_store)

    guests = (p.uid, ghost_uid, bare_uid)

    def all_isolated() -> bool:
        plugged = vifs.switch.vif_ports()
        return all(is_isolated(plugged[uid]) for uid in guests)

    await eventually(all_isolated, timeout=60, what="every VIF isolated after the restart")
    assert dhcp_lease(guest, timeout=4) == {}, "unbound again: no lease"
    unbound = await kube.get(Port, "p", ns)
    assert unbound is not None and not unbound.status.is_true("Ready")
    for uid in guests:
        vifs.unplug(uid)


async def _dhcp_served(kube: Kube, ns: str, name: str) -> bool:
    p = await kube.get(Port, name, ns)
    return bool(p and p.status.dhcp and p.status.dhcp.ip_addresses)


@pytest.fixture(scope="module")
def guest_image() -> tuple[Path, str]:
    path = build_guest_image()
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def test_an_instance_whose_port_is_not_bound_does_not_boot(
    kube: Kube,
    controller: Process,
    agent: dict[str, Process],
    fabric: Fabric,
    namespace: str,
    guest_image: tuple[Path, str],
) -> None:
    ns, node = namespace, fabric.nodes[0]
    here, nowhere = node_name(fabric, node), f"{fabric.prefix}-nowhere"
    path, sha = guest_image
    image(ns, "guest", path, sha)
    network(ns, "net", fabric, type="vxlan")
    subnet(ns, "net-v4", "net", "10.42.0.0/24")
    size = f"tiny-{uuid.uuid4().hex[:6]}"
    flavor(size)
    try:
        apply(
            {
                "apiVersion": COMPUTE,
                "kind": "Instance",
                "metadata": {"name": "vm", "namespace": ns},
                "spec": {
                    "availabilityZone": fabric.prefix,
                    "flavor": size,
                    "image": {"name": "guest"},
                    "networks": [{"port": "vm-nic"}],
                },
            }
        )
        vm = await eventually(lambda: kube.get(Instance, "vm", ns), timeout=30, what="vm")
        port(ns, "vm-nic", "net", nowhere, deviceId=vm.uid, deviceOwner="compute:nova")
        domain = f"nubes-{vm.uid}-{hashlib.sha256(here.encode()).hexdigest()[:8]}"

        async def reported() -> Instance | None:
            got = await kube.get(Instance, "vm", ns)
            cond = got.status.condition("Reconciling") if got else None
            return got if cond and cond.reason == "PortBindingTimeout" else None

        vm = await eventually(reported, timeout=240, what="vm reports PortBindingTimeout")
        cond = vm.status.condition("Reconciling")
        assert cond is not None and "port vm-nic" in cond.message, cond
        assert f"bound to node {nowhere}" in cond.message
        assert not vm.status.is_true("Ready")
        assert vm.status.node_problem and vm.status.node_problem.reason == "PortBindingTimeout"
        # Staged at most: QEMU set up paused, the guest's CPUs never ran.
        assert domain_state(domain) in (DomainState.ABSENT, DomainState.SHUTOFF, DomainState.PAUSED)
        assert vm.status.power_state != "Running"

        # Bound on the instance's node (the binding follows the instance
        # again): it boots, and the guest is on its network.
        kubectl(
            "patch",
            "port",
            "vm-nic",
            "-n",
            ns,
            "--type=json",
            "-p",
            '[{"op": "remove", "path": "/spec/binding/host"}]',
        )
        vm = await condition(kube, Instance, "vm", ns, timeout=180)
        assert vm.status.power_state == "Running" and vm.status.node_problem is None
        assert domain_state(domain) == DomainState.RUNNING
        ip = vm.status.addresses[0].ip_addresses[0]
        await wait_console(kube, "vm", ns, f"lease eth0 ip={ip}/24")
    finally:
        kubectl("delete", "instances", "--all", "-n", ns, "--wait=false", check=False)

        async def gone() -> bool:
            return not await kube.list(Instance, ns)

        await eventually(gone, timeout=180, what="instances deleted")
        kubectl("delete", "flavor", size, "--ignore-not-found", "--wait=false")
    assert domain_state(domain) == DomainState.ABSENT
