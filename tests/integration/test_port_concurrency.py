"""No duplicate IP, MAC or segmentation id when two controller workers
(shards 0/2 and 1/2) allocate from one subnet and one range at once, against
the real API server. Its own module: the networking tests' controller, which
owns every object, would make a third writer no deployment has."""

from __future__ import annotations

import os

import pytest
import yaml

from nubes.api.network import Allocation, Network, Port
from nubes.runtime.kube import Kube
from tests.helpers import eventually, kubectl
from tests.integration.cloud import NET
from tests.integration.conftest import start_controller


@pytest.mark.parametrize("count", [int(os.environ.get("NUBES_TEST_PORTS", "200"))])
async def test_concurrent_ports_across_two_controller_workers(
    kube: Kube, tmp_path_factory: pytest.TempPathFactory, namespace: str, count: int
) -> None:
    """No duplicate IP, MAC or segmentation id when two controller workers
    allocate from the same subnet and ranges at once."""
    workers = [
        start_controller(
            tmp_path_factory,
            "controller",
            "--shard",
            f"{i}/2",
            "--vxlan-range",
            "5000:5999",
            name=f"worker-{i}",
        )
        for i in range(2)
    ]
    try:
        docs = []
        for i in range(20):
            docs.append(
                {
                    "apiVersion": NET,
                    "kind": "Network",
                    "metadata": {"name": f"n{i}", "namespace": namespace},
                    "spec": {"type": "vxlan"},
                }
            )
        docs.append(
            {
                "apiVersion": NET,
                "kind": "Subnet",
                "metadata": {"name": "big", "namespace": namespace},
                "spec": {"network": {"name": "n0"}, "cidr": "10.50.0.0/22", "enableDhcp": False},
            }
        )
        for i in range(count):
            docs.append(
                {
                    "apiVersion": NET,
                    "kind": "Port",
                    "metadata": {"name": f"p{i}", "namespace": namespace},
                    "spec": {"network": {"name": "n0"}},
                }
            )
        kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

        async def all_ready() -> list[Port] | None:
            ports = await kube.list(Port, namespace)
            ready = [p for p in ports if p.status.is_true("Ready")]
            return ready if len(ready) == count else None

        ports = await eventually(all_ready, timeout=180, interval=1, what=f"{count} ports Ready")
        ips = [p.status.fixed_ips[0].ip_address for p in ports]
        macs = [p.status.mac_address for p in ports]
        dups = {
            ip: [p.name for p in ports if p.status.fixed_ips[0].ip_address == ip]
            for ip in ips
            if ips.count(ip) > 1
        }
        if dups:
            allocs = [
                (a.name, a.spec.owner.name)
                for a in await kube.list(Allocation)
                if a.spec.owner.namespace == namespace and a.spec.value in dups
            ]
            raise AssertionError(f"duplicate IPs: {dups}; allocations: {allocs}")
        assert len(set(macs)) == count, "duplicate MAC"
        nets = await kube.list(Network, namespace)
        segments = [n.status.segmentation_id for n in nets]
        assert None not in segments and len(set(segments)) == 20, "duplicate segmentation id"
        # Both workers did part of the work.
        for worker in workers:
            assert 'kind="Port",process="nubes-controller-' in worker.metrics()
            assert "nubes_status_writes_total" in worker.metrics()
        writes = [_status_writes(w.metrics(), "Port") for w in workers]
        assert all(w > 0 for w in writes), writes
        kubectl("delete", "ports,subnets,networks", "--all", "-n", namespace, "--wait=false")

        async def released() -> bool:
            return not [
                a for a in await kube.list(Allocation) if a.spec.owner.namespace == namespace
            ]

        await eventually(released, timeout=120, interval=1, what="allocations released")
    finally:
        for worker in workers:
            worker.stop()
            worker.assert_no_crash()


def _status_writes(metrics: str, kind: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("nubes_status_writes_total{") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
