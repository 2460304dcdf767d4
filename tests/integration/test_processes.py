"""The controller and the node agent start against the real API server, own
their status fields, expose /healthz and Prometheus metrics, and leave no
process behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nubes.api.compute import Hypervisor
from nubes.api.network import Network
from nubes.runtime.kube import Kube, path_of
from tests.helpers import Process, apply, eventually
from tests.integration.conftest import get_condition, start_process
from tests.integration.identity import agent_env


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    state = tmp_path_factory.mktemp("agent-state")
    proc = start_process(
        tmp_path_factory,
        "agent",
        "agent",
        "--node",
        "proc-test-node",
        "--state-dir",
        str(state),
        "--run-dir",
        str(state / "run"),
        env=agent_env(state, "proc-test-node"),
    )
    yield proc
    proc.stop()
    proc.assert_no_crash()


async def test_agent_registers_and_heartbeats(
    kube: Kube, controller: Process, agent: Process
) -> None:
    async def reported() -> Hypervisor | None:
        hv = await kube.get(Hypervisor, "proc-test-node")
        return hv if hv and hv.status.heartbeat_time and hv.status.vcpus else None

    hv = await eventually(reported, timeout=60, what="hypervisor report")
    assert hv.status.virt_type in ("kvm", "qemu")
    assert hv.status.ram_mib and hv.status.ram_mib > 0
    assert hv.spec.availability_zone == "nova"

    ready = await eventually(
        lambda: get_condition(kube, path_of(Hypervisor), "proc-test-node", None),
        what="Ready condition",
    )
    assert ready["status"] == "True"
    await kube.delete_raw(path_of(Hypervisor), "proc-test-node")


async def test_controller_sets_conditions_with_observed_generation(
    kube: Kube, controller: Process, namespace: str
) -> None:
    apply(
        {
            "apiVersion": "network.nubes.io/v1alpha1",
            "kind": "Network",
            "metadata": {"name": "cond", "namespace": namespace},
            "spec": {},
        }
    )

    async def observed() -> Network | None:
        net = await kube.get(Network, "cond", namespace)
        return net if net and net.status.observed_generation == net.generation else None

    net = await eventually(observed, what="observedGeneration")
    ready = net.status.condition("Ready")
    assert ready is not None and ready.observed_generation == net.generation
    assert ready.reason and ready.reason[0].isupper()


def test_health_and_metrics(controller: Process, agent: Process) -> None:
    controller.wait_healthy()
    agent.wait_healthy()
    assert "nubes_reconcile_total" in controller.metrics()
    assert 'process="nubes-agent-proc-test-node"' in agent.metrics()


def test_processes_stop_cleanly(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    proc = start_process(tmp_path_factory, "short-lived", "controller")
    pid = proc.proc.pid if proc.proc else 0
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0, proc.logs()[-2000:]
    alive = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    assert alive.stdout.strip() == ""
    proc.assert_no_crash()
