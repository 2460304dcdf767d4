"""Volume create and secure-wipe throughput, through the API.

    python -m bench.volumes [--volumes 100] [--size-gib 10] [--small-gib 1] [--wipe-mib 1024]

Starts its own controller and storage agent (its own node, zone, pool and
state directory on the real disk), then:

1. creates N volumes of SIZE GiB through the API server at once and times
   them until every one is Ready, then deletes them until every one is gone;
2. does the same with SMALL GiB volumes: the file pool is thin, so the time
   must not grow with the size;
3. measures the agent's secure wipe (zeros over every allocated block) next
   to `dd if=/dev/zero oflag=direct` of the same size in the same pool
   directory, in the same run.

Prints progress on stderr and one JSON object as the last line of stdout.
Everything it made (processes, namespace, Hypervisor, files) is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.cluster import install_crds
from nubes.api.compute import Hypervisor
from nubes.api.storage import Volume
from nubes.drivers.runner import SubprocessRunner
from nubes.drivers.volumes.benchmark import wipe_vs_dd
from nubes.runtime.kube import NAMESPACES, ApiError, Kube, path_of
from nubes.runtime.logging import configure

CONCURRENCY = 32


def say(*parts: object) -> None:
    print("bench.volumes:", *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def process(name: str, args: list[str], logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A nubes process, healthy before the block runs, stopped after it."""
    port = free_port()
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nubes.runtime.cli", *args, "--health-port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited {proc.returncode}; see {logs / name}.log")
            url = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not healthy after 60 s; see {logs / name}.log")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def create_volumes(
    kube: Kube, ns: str, prefix: str, count: int, size_gib: int, zone: str
) -> float:
    """Seconds from the first create until all `count` volumes are Ready."""
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def create(i: int) -> None:
        body = {
            "apiVersion": Volume.crd.api_version,
            "kind": "Volume",
            "metadata": {"name": f"{prefix}-{i:04d}", "namespace": ns},
            "spec": {"sizeGib": size_gib, "availabilityZone": zone},
        }
        async with semaphore:
            await kube.create_raw(path_of(Volume), body, ns)

    started = time.perf_counter()
    await asyncio.gather(*(create(i) for i in range(count)))
    while True:
        volumes = [v for v in await kube.list(Volume, ns) if v.name.startswith(prefix)]
        ready = [v for v in volumes if v.status.is_true("Ready")]
        if len(ready) == count:
            return time.perf_counter() - started
        stalled = [v for v in volumes if v.status.is_true("Stalled")]
        if stalled:
            cond = stalled[0].status.condition("Stalled")
            raise SystemExit(f"volume {stalled[0].name} stalled: {cond.message if cond else ''}")
        if time.perf_counter() - started > 600:
            raise SystemExit(f"only {len(ready)}/{count} volumes Ready after 600 s")
        await asyncio.sleep(0.1)


async def delete_volumes(kube: Kube, ns: str, prefix: str) -> float:
    volumes = [v for v in await kube.list(Volume, ns) if v.name.startswith(prefix)]
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def delete(v: Volume) -> None:
        async with semaphore:
            await kube.delete(v)

    started = time.perf_counter()
    await asyncio.gather(*(delete(v) for v in volumes))
    while [v for v in await kube.list(Volume, ns) if v.name.startswith(prefix)]:
        if time.perf_counter() - started > 600:
            raise SystemExit("volumes not deleted after 600 s")
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


def allocated_bytes(pool: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (pool / "volumes").glob("*.raw"))


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    node = f"bench-{uuid.uuid4().hex[:6]}"
    ns = node
    pool = workdir / "pool"
    logs = workdir / "logs"
    logs.mkdir()
    kube = await Kube.connect(field_manager="bench-volumes")
    controller_args = ["controller", "--image-store", str(workdir / "images")]
    agent_args = [
        "agent",
        "--node",
        node,
        "--availability-zone",
        node,
        "--state-dir",
        str(workdir / "state"),
        "--run-dir",
        str(workdir / "run"),
        "--volume-backend",
        f"{node}:file:{pool}",
        "--virt-type",
        "qemu",
    ]
    result: dict[str, Any] = {}
    try:
        await kube.create_raw(
            NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        with process("controller", controller_args, logs), process("agent", agent_args, logs):
            await wait_for_pool(kube, node)
            for size, key in ((args.size_gib, "create"), (args.small_gib, "create_small")):
                say(f"creating {args.volumes} volumes of {size} GiB")
                seconds = await create_volumes(kube, ns, f"v{size}g", args.volumes, size, node)
                allocated = allocated_bytes(pool)
                say(f"  all Ready in {seconds:.2f} s; they allocate {allocated} bytes")
                deleted = await delete_volumes(kube, ns, f"v{size}g")
                say(f"  all deleted (wiped) in {deleted:.2f} s")
                result[f"{key}_size_gib"] = size
                result[f"{key}_total_s"] = round(seconds, 3)
                result[f"{key}_per_volume_s"] = round(seconds / args.volumes, 4)
                result[f"{key}_allocated_bytes"] = allocated
                result[f"{key}_delete_total_s"] = round(deleted, 3)
            say(f"secure wipe vs dd, {args.wipe_mib} MiB in {pool}")
            wipe = await asyncio.to_thread(wipe_vs_dd, SubprocessRunner(), str(pool), args.wipe_mib)
            say(f"  wipe {wipe.wipe_mib_s:.0f} MiB/s, dd {wipe.dd_mib_s:.0f} MiB/s")
    finally:
        with contextlib.suppress(ApiError):
            await kube.delete_raw(NAMESPACES, ns)
        with contextlib.suppress(ApiError):
            await kube.delete_raw(path_of(Hypervisor), node)
        await kube.close()
    return {
        "volumes": args.volumes,
        "size_gib": args.size_gib,
        "create_total_s": result["create_total_s"],
        "create_per_volume_s": result["create_per_volume_s"],
        "create_allocated_bytes": result["create_allocated_bytes"],
        "delete_total_s": result["create_delete_total_s"],
        "small_size_gib": args.small_gib,
        "small_create_total_s": result["create_small_total_s"],
        "small_create_per_volume_s": result["create_small_per_volume_s"],
        "size_ratio": round(result["create_total_s"] / result["create_small_total_s"], 3),
        "wipe_mib": args.wipe_mib,
        "wipe_mib_s": round(wipe.wipe_mib_s, 1),
        "dd_mib_s": round(wipe.dd_mib_s, 1),
        "wipe_vs_dd": round(wipe.ratio, 3),
    }


async def wait_for_pool(kube: Kube, node: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hv = await kube.get(Hypervisor, node)
        if hv is not None and hv.status.is_true("Ready") and hv.status.storage_pools:
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"node {node} reported no storage pool in 60 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.volumes", description=__doc__)
    p.add_argument("--volumes", type=int, default=100)
    p.add_argument("--size-gib", type=int, default=10)
    p.add_argument("--small-gib", type=int, default=1)
    p.add_argument("--wipe-mib", type=int, default=1024)
    p.add_argument(
        "--workdir",
        default=os.environ.get("NUBES_BENCH_DIR", "/var/tmp"),
        help="where the pool lives (a real disk, not tmpfs)",
    )
    args = p.parse_args(argv)
    configure("warning")
    install_crds()
    workdir = Path(tempfile.mkdtemp(prefix="nubes-bench-volumes-", dir=args.workdir))
    try:
        figures = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
