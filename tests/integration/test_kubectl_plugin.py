"""`kubectl nubes` found by kubectl on PATH (krew naming) against the real API
server and controller: why, console, hypervisors, and an instance action
created, waited for and its failure reported."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from nubes.runtime.kubectl_plugin import _new_text
from tests.helpers import ROOT, Process, apply, eventually, kubectl, kubectl_bin


def plugin(*args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl nubes ...` as a user runs it: kubectl finds kubectl-nubes on PATH."""
    path = os.pathsep.join(
        [str(Path(kubectl_bin()).parent), str(ROOT / ".venv" / "bin"), os.environ["PATH"]]
    )
    return subprocess.run(
        [kubectl_bin(), "nubes", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path},
        check=False,
    )


def test_kubectl_finds_the_plugin() -> None:
    path = os.pathsep.join([str(ROOT / ".venv" / "bin"), os.environ["PATH"]])
    out = subprocess.run(
        [kubectl_bin(), "plugin", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        check=False,
    )
    assert "kubectl-nubes" in out.stdout, out.stdout + out.stderr


async def test_why_explains_a_stalled_object(controller: Process, namespace: str) -> None:
    apply(
        {
            "apiVersion": "image.nubes.io/v1alpha1",
            "kind": "Image",
            "metadata": {"name": "private-src", "namespace": namespace},
            # A non-public address: refused by the import policy, never fetched.
            "spec": {"source": {"url": "http://10.1.2.3/x.raw"}, "diskFormat": "raw"},
        }
    )

    def stalled() -> subprocess.CompletedProcess[str] | None:
        out = plugin("why", "image", "private-src", "-n", namespace)
        return out if "Stalled=True" in out.stdout else None

    out = await eventually(stalled, timeout=60, what="Stalled shown by kubectl nubes why")
    assert out.returncode == 1, out  # not Ready
    assert out.stdout.startswith(f"Image {namespace}/private-src")
    assert "Ready=False" in out.stdout and "10.1.2.3" in out.stdout, out.stdout
    # Without the kind: found among the Nubes kinds by name.
    again = plugin("-n", namespace, "why", "private-src")
    assert again.stdout == out.stdout
    missing = plugin("-n", namespace, "why", "nothing-here")
    assert missing.returncode == 1 and "no Nubes object named nothing-here" in missing.stderr


async def test_console_prints_the_console_configmap(namespace: str) -> None:
    text = "nubes-guest: boot\nnubes-guest: ready\n"
    apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "vm1-console", "namespace": namespace},
            "data": {"console.log": text},
        }
    )
    out = plugin("console", "vm1", "-n", namespace)
    assert out.returncode == 0 and out.stdout == text, out
    none = plugin("console", "vm2", "-n", namespace)
    assert none.returncode == 1 and "vm2-console does not exist" in none.stderr


def test_console_follow_joins_a_truncated_tail() -> None:
    old = "a\n" * 10 + "line 10\n"
    # The ConfigMap keeps the tail only: the head went, new lines came.
    assert _new_text(old, old[6:] + "line 11\n") == "line 11\n"
    assert _new_text(old, old + "x\n") == "x\n"
    assert _new_text("", "first\n") == "first\n"


async def test_hypervisors_table() -> None:
    name = "plugin-test-hv"
    apply(
        {
            "apiVersion": "compute.nubes.io/v1alpha1",
            "kind": "Hypervisor",
            "metadata": {"name": name},
            "spec": {"availabilityZone": "az-plugin", "disabled": True},
        }
    )
    try:
        status = {
            "status": {
                "vcpus": 4,
                "vcpusUsed": 1,
                "ramMib": 8192,
                "ramMibUsed": 1024,
                "virtType": "qemu",
                "runningVms": 1,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": "HeartbeatLost",
                        "message": "no heartbeat",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        }
        kubectl(
            "patch", "hypervisor", name, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
        out = plugin("hypervisors")
        assert out.returncode == 0, out
        header, *rows = out.stdout.splitlines()
        assert header.split()[:4] == ["NAME", "ZONE", "STATE", "READY"]
        row = next(r for r in rows if r.startswith(name)).split()
        assert row[1:4] == ["az-plugin", "disabled", "down"]
        assert "1/4" in row and "1024/8192" in row
    finally:
        kubectl("delete", "hypervisor", name, "--ignore-not-found")


async def test_reboot_creates_an_action_and_waits_for_it(
    controller: Process, namespace: str
) -> None:
    gone = plugin("reboot", "no-such-vm", "-n", namespace)
    assert gone.returncode == 1 and "instance no-such-vm not found" in gone.stderr
    apply(
        {
            "apiVersion": "compute.nubes.io/v1alpha1",
            "kind": "Instance",
            "metadata": {"name": "vm1", "namespace": namespace},
            "spec": {"flavor": "no-such-flavor", "image": {"name": "no-such-image"}},
        }
    )
    out = plugin("reboot", "vm1", "--hard", "-n", namespace, "--timeout", "15")
    actions = json.loads(kubectl("get", "instanceactions", "-n", namespace, "-o", "json").stdout)
    [action] = actions["items"]
    name = action["metadata"]["name"]
    assert action["spec"] == {"instance": "vm1", "action": "HardReboot"}
    assert f"instanceaction/{name} created (HardReboot)" in out.stdout
    # The instance never runs (no such flavor): the action waits, the plugin
    # gives up waiting with exit code 2 and says how to look.
    assert out.returncode == 2, out
    assert f"kubectl nubes why instanceaction {name}" in out.stdout
    why = plugin("why", "instanceaction", name, "-n", namespace)
    assert why.returncode == 1 and "Ready=False" in why.stdout, why
