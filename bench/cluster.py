"""What every benchmark needs of the cluster KUBECONFIG names (the CRDs, as
`make demo` installs them: a cluster started for the run is empty), and the
waits and measures the benchmarks share."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from nubes.drivers.runner import SubprocessRunner
from nubes.runtime.kube import NAMESPACES, Kube

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(os.environ.get("NUBES_CACHE", Path.home() / ".cache" / "nubes")) / "bin" / "kubectl"


def install_crds() -> None:
    apply = [str(KUBECTL), "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")]
    SubprocessRunner()(apply, timeout=120)
    wait = [str(KUBECTL), "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]
    SubprocessRunner()(wait, timeout=90)


async def namespace_gone(kube: Kube, ns: str) -> bool:
    return await kube.get_raw(NAMESPACES, ns) is None


async def wait_for(probe: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll the coroutine function `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmHWM: its peak) from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_of(name: str) -> list[int]:
    """Processes whose executable is called `name` (the control plane's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process and of the control plane."""
    named = dict(pids)
    for daemon in ("kube-apiserver", "etcd"):
        for pid in pids_of(daemon)[:1]:
            named[daemon] = pid
    out = {}
    for name, pid in named.items():
        try:
            out[name] = cpu_seconds(pid)
        except OSError:
            continue
    return out


WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}


def api_writes(group: str) -> dict[str, int]:
    """Writes the API server has served for an API group since it started,
    by `resource[/subresource] VERB`, from its own request counters."""
    text = SubprocessRunner()([str(KUBECTL), "get", "--raw", "/metrics"], timeout=60).stdout
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition("} ")
        labels = dict(
            part.split("=", 1)
            for part in labels_text.removeprefix("apiserver_request_total{").split(",")
        )
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("group") != group or labels.get("verb") not in WRITE_VERBS:
            continue
        sub = f"/{labels['subresource']}" if labels.get("subresource") else ""
        key = f"{labels['resource']}{sub} {labels['verb']}"
        counts[key] = counts.get(key, 0) + int(float(value))
    return counts


def writes_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}
