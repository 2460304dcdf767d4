"""Fixtures for tests against the real kube-apiserver (and node daemons)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nubes.runtime.kube import NAMESPACES, ApiError, KindPath, Kube
from tests.helpers import ROOT, Process, eventually, free_port, kubectl

CRDS = KindPath("apiextensions.k8s.io", "v1", "customresourcedefinitions", False)
RESOURCEQUOTAS = KindPath("", "v1", "resourcequotas", True)
COMPONENTS_NAMESPACE = "nubes-system"
"""Where the chart's ServiceAccounts and the agents' CHAP Secrets live."""


@pytest.fixture(scope="session")
async def kube() -> AsyncIterator[Kube]:
    client = await Kube.connect(field_manager="nubes-tests")
    try:
        await client.request("GET", "/readyz")
    except Exception as e:
        pytest.fail(f"no API server (run through `make test`): {e}")
    yield client
    await client.close()


async def apply_crds(kube: Kube) -> None:
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        await kube.apply_raw(CRDS, crd)

    async def established() -> bool:
        for path in (ROOT / "crds").glob("*.yaml"):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            got = await kube.get_raw(CRDS, name)
            conditions = (got or {}).get("status", {}).get("conditions", [])
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    await eventually(established, timeout=30, what="CRDs established")


def render_chart(*extra: str) -> str:
    """The Helm chart's cluster objects without the workloads (no kubelet here:
    the controller and agent run as local processes in tests)."""
    helm = os.path.join(
        os.environ.get("NUBES_CACHE", os.path.expanduser("~/.cache/nubes")), "bin", "helm"
    )
    argv = [
        helm,
        "template",
        "nubes",
        str(ROOT / "charts" / "nubes"),
        "--namespace",
        COMPONENTS_NAMESPACE,
        "--set",
        "controller.enabled=false",
        "--set",
        "agent.enabled=false",
        "--set",
        "crds.enabled=false",
        *extra,
    ]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session", autouse=True)
async def platform(kube: Kube) -> None:
    """CRDs, roles and admission policies, as the chart installs them."""
    await apply_crds(kube)
    # The components' namespace: ServiceAccounts, CHAP Secrets.
    if await kube.get_raw(NAMESPACES, COMPONENTS_NAMESPACE) is None:
        with contextlib.suppress(ApiError):
            await kube.create_raw(
                NAMESPACES,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": COMPONENTS_NAMESPACE},
                },
            )
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=render_chart())
    await quota_counts_custom_resources(kube)


async def quota_counts_custom_resources(kube: Kube) -> None:
    """Wait until the API server's quota system counts Nubes kinds: the
    resourcequota controller learns of new CRDs on its discovery resync
    (about 30 s after they appear), and until then a project's quota has no
    usage and member creations are refused as 'status unknown for quota'."""
    probe = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "nubes-tests-probe", "namespace": COMPONENTS_NAMESPACE},
        "spec": {"hard": {"count/instances.compute.nubes.io": "0"}},
    }
    kubectl("apply", "-f", "-", input=yaml.safe_dump(probe))

    async def counted() -> bool:
        got = await kube.get_raw(RESOURCEQUOTAS, "nubes-tests-probe", COMPONENTS_NAMESPACE)
        used = (got or {}).get("status", {}).get("used", {})
        return "count/instances.compute.nubes.io" in used

    try:
        await eventually(counted, timeout=180, what="the quota controller counting Nubes kinds")
    finally:
        kubectl("delete", "resourcequota", "nubes-tests-probe", "-n", COMPONENTS_NAMESPACE)


@pytest.fixture(scope="session", autouse=True)
def node_objects() -> Iterator[None]:
    """Node objects created for the agents' node-bound tokens (cluster-scoped)
    are deleted at the end of the session, after the modules' agents stop."""
    # Imported here: identity imports this module (COMPONENTS_NAMESPACE).
    from tests.integration.identity import delete_created_nodes

    yield
    delete_created_nodes()


@pytest.fixture
async def namespace(kube: Kube) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await kube.create_raw(
        NAMESPACES,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"nubes.io/test": "true"}},
        },
    )
    yield name
    with contextlib.suppress(ApiError):
        await kube.delete_raw(NAMESPACES, name)
    # While the test's controller and agents still run: their finalizers
    # remove DHCP servers, domains, exports... before the namespace goes.
    await eventually(
        lambda: namespace_gone(kube, name), timeout=180, what=f"namespace {name} deleted"
    )


async def namespace_gone(kube: Kube, name: str) -> bool:
    return await kube.get_raw(NAMESPACES, name) is None


def start_process(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *argv: str,
    env: dict[str, str] | None = None,
) -> Process:
    logs: Path = tmp_path_factory.mktemp("logs") / f"{name}.log"
    return Process(name, list(argv), logs, free_port(), env or {}).start()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """State shared with QEMU (which runs as another user and cannot enter
    pytest's 0700 temp dirs): a world-traversable directory, removed after,
    once no process the tests started (dnsmasq, QEMU...) still uses it."""
    path = Path(tempfile.mkdtemp(prefix="nubes-tests-", dir="/var/tmp"))
    path.chmod(0o755)
    os.environ["NUBES_TEST_IMPORT_DIR"] = str(path)  # read by cloud.image()
    yield path
    left = processes_using(str(path), str(tmp_path_factory.getbasetemp()))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"processes outlived the tests: {left}"


def processes_using(*paths: str) -> dict[int, str]:
    """Processes whose command line names one of the paths."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(p in argv for p in paths):
            found[int(proc.name)] = argv[:200]
    return found


@pytest.fixture(scope="session")
def image_store(workdir: Path) -> Path:
    path = workdir / "images"
    path.mkdir(mode=0o755)
    return path


# Test image servers listen here; the controller's own ports are on 127.0.0.1,
# which its import policy keeps refusing (loopback), as in production.
IMAGE_SERVER_ADDRESS = "127.0.0.2"


def controller_argv(image_store: Path, *extra: str) -> list[str]:
    """The suite's controller: file:// sources below the tests' work directory
    (where cloud.image() puts image files), http sources on IMAGE_SERVER_ADDRESS."""
    return [
        "controller",
        "--image-store",
        str(image_store),
        "--image-import-dir",
        str(image_store.parent),
        "--image-import-allow-network",
        f"{IMAGE_SERVER_ADDRESS}/32",
        *extra,
    ]


def start_controller(
    tmp_path_factory: pytest.TempPathFactory, *argv: str, name: str = "controller"
) -> Process:
    """A controller acting as the chart's nubes-controller ServiceAccount, so
    every test also proves the chart's controller role is enough."""
    from tests.integration.identity import controller_env  # imports this module

    env = controller_env(tmp_path_factory.mktemp("tokens"))
    return start_process(tmp_path_factory, name, *argv, env=env)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, image_store: Path) -> Iterator[Process]:
    proc = start_controller(tmp_path_factory, *controller_argv(image_store))
    yield proc
    proc.stop()
    proc.assert_no_crash()


async def get_condition(
    kube: Kube, kp: KindPath, name: str, namespace: str | None, type_: str = "Ready"
) -> dict[str, Any] | None:
    obj = await kube.get_raw(kp, name, namespace)
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return None


__all__ = ["asyncio", "get_condition"]
