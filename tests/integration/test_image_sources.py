"""Image sources as hostile input, against the real API server and controller:
tenants (impersonated project members) cannot make the controller read host
files or reach loopback, link-local or private addresses (directly, by name,
or through a redirect); limits on size and time hold, and one endless source
does not hold up other imports. The digest of rejected data is not shown."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.api.identity import Project
from nubes.api.image import Image
from nubes.runtime.kube import Kube
from tests.helpers import Process, apply, eventually, kubectl
from tests.image_server import Handler, serve
from tests.integration.cloud import IMAGE, condition
from tests.integration.conftest import (
    IMAGE_SERVER_ADDRESS,
    controller_argv,
    namespace_gone,
    start_controller,
)

SLOW_ADDRESS = "127.0.0.3"  # a second "public" server: the endless one
MAX_BYTES = 2 * 2**20
DEADLINE = 20
GOOD = os.urandom(256 * 1024)


@pytest.fixture(scope="module")
def good_server() -> Iterator[str]:
    yield from serve(IMAGE_SERVER_ADDRESS)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    yield from serve(SLOW_ADDRESS)


@pytest.fixture(scope="module")
def import_dir(image_store: Path) -> Path:
    path = image_store.parent / "import-only"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def controller(
    tmp_path_factory: pytest.TempPathFactory, image_store: Path, import_dir: Path
) -> Iterator[Process]:
    """The suite's controller with this module's tighter limits."""
    argv = controller_argv(
        image_store,
        "--image-import-allow-network",
        f"{SLOW_ADDRESS}/32",
        "--image-max-bytes",
        str(MAX_BYTES),
        "--image-import-deadline",
        str(DEADLINE),
        "--image-import-stall-timeout",
        "5",
    )
    argv[argv.index("--image-import-dir") + 1] = str(import_dir)
    proc = start_controller(tmp_path_factory, *argv)
    yield proc
    proc.stop()
    proc.assert_no_crash()


@pytest.fixture
async def project(kube: Kube, controller: Process) -> AsyncIterator[str]:
    name = f"img-{uuid.uuid4().hex[:6]}"
    apply(
        {
            "apiVersion": "identity.nubes.io/v1alpha1",
            "kind": "Project",
            "metadata": {"name": name},
            "spec": {"members": [{"name": "mallory", "role": "member"}]},
        }
    )
    await condition(kube, Project, name, None)
    yield name
    kubectl("delete", "project", name, "--wait=false", check=False)
    # While this module's controller runs: its finalizers free the store.
    await eventually(
        lambda: namespace_gone(kube, name), timeout=120, what=f"namespace {name} deleted"
    )


@pytest.fixture
def cloud_admin() -> Iterator[str]:
    user = f"operator-{uuid.uuid4().hex[:6]}"
    kubectl(
        "create", "clusterrolebinding", user, "--clusterrole=nubes:cloud-admin", f"--user={user}"
    )
    yield user
    kubectl("delete", "clusterrolebinding", user, check=False)


def image(ns: str, name: str, url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": IMAGE,
        "kind": "Image",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"source": {"url": url}, "diskFormat": "raw", **spec},
    }


def as_user(user: str, manifest: dict[str, Any]) -> tuple[int, str]:
    result = apply(manifest, check=False, user=user)
    return result.returncode, result.stderr


async def stalled(kube: Kube, name: str, ns: str, timeout: float = 60) -> Image:
    img: Image = await condition(kube, Image, name, ns, "Stalled", timeout=timeout)
    return img


def reason(img: Image) -> tuple[str, str]:
    cond = img.status.condition("Stalled")
    assert cond is not None
    return cond.reason or "", cond.message or ""


async def test_file_sources_are_for_cloud_admins_and_only_below_the_import_dir(
    kube: Kube, project: str, cloud_admin: str, import_dir: Path
) -> None:
    ns = project
    rc, err = as_user("mallory", image(ns, "shadow", "file:///etc/shadow"))
    assert rc != 0
    assert "file:// sources are for cloud administrators only" in err
    assert kubectl("get", "image", "shadow", "-n", ns, check=False).returncode != 0

    # Even a cloud admin reads nothing outside the operator's directory.
    assert as_user(cloud_admin, image(ns, "shadow", "file:///etc/shadow"))[0] == 0
    escape = import_dir / "escape"
    escape.unlink(missing_ok=True)
    escape.symlink_to("/etc/passwd")
    assert as_user(cloud_admin, image(ns, "escape", escape.as_uri()))[0] == 0
    for name in ("shadow", "escape"):
        img = await stalled(kube, name, ns)
        why, message = reason(img)
        assert why == "SourceNotAllowed" and str(import_dir) in message, message
        assert img.status.size_bytes is None and img.status.sha256 is None

    inside = import_dir / f"{ns}.raw"
    inside.write_bytes(GOOD)
    assert as_user(cloud_admin, image(ns, "inside", inside.as_uri()))[0] == 0
    ok = await condition(kube, Image, "inside", ns)
    assert ok.status.sha256 == hashlib.sha256(GOOD).hexdigest()
    inside.unlink()


async def test_members_cannot_reach_the_control_plane_or_the_host_network(
    kube: Kube, project: str, controller: Process, good_server: str
) -> None:
    ns = project
    metrics = f"127.0.0.1:{controller.health_port}/metrics"
    Handler.routes = {
        "/to-metrics": (302, {"Location": f"http://{metrics}"}, b""),
        "/to-file": (302, {"Location": "file:///etc/shadow"}, b""),
    }
    cases = {
        "loopback": f"http://{metrics}",
        "by-name": f"http://localhost:{controller.health_port}/metrics",
        "ipv6-loopback": f"http://[::1]:{controller.health_port}/metrics",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.0.0.1/disk.img",
        "redirect": f"{good_server}/to-metrics",
        "redirect-file": f"{good_server}/to-file",
    }
    for name, url in cases.items():
        rc, err = as_user("mallory", image(ns, name, url))
        assert rc == 0, err
    for name in cases:
        img = await stalled(kube, name, ns)
        why, message = reason(img)
        assert why == "SourceNotAllowed", (name, why, message)
        assert img.status.size_bytes is None, name
    assert "nubes_" in controller.metrics(), "the metrics port was there to be stolen"


async def test_bad_data_and_limits_stall_with_reasons_and_hide_digests(
    kube: Kube, project: str, good_server: str
) -> None:
    ns = project
    big = os.urandom(MAX_BYTES + 1)
    Handler.routes = {"/good.raw": (200, {}, GOOD), "/big.raw": (200, {}, big)}
    wrong = "0" * 64
    assert as_user("mallory", image(ns, "wrong", f"{good_server}/good.raw", sha256=wrong))[0] == 0
    assert as_user("mallory", image(ns, "big", f"{good_server}/big.raw"))[0] == 0

    img = await stalled(kube, "wrong", ns)
    why, message = reason(img)
    actual = hashlib.sha256(GOOD).hexdigest()
    assert why == "ChecksumMismatch" and wrong in message
    raw = kubectl("get", "image", "wrong", "-n", ns, "-o", "json").stdout
    assert actual not in raw, "the digest of data that failed verification is shown"
    assert img.status.sha256 is None

    img = await stalled(kube, "big", ns)
    assert reason(img)[0] == "ImageTooLarge"


async def test_an_endless_source_does_not_hold_up_other_imports(
    kube: Kube, project: str, good_server: str, slow_server: str
) -> None:
    ns = project
    Handler.routes = {"/good.raw": (200, {}, GOOD)}
    Handler.trickle_delay = 1.0  # a byte a second: never stalls, never ends
    for i in range(3):  # more than the per-source limit, as many as the pool
        assert as_user("mallory", image(ns, f"endless-{i}", f"{slow_server}/trickle{i}"))[0] == 0
    time.sleep(1)
    started = time.monotonic()
    assert as_user("mallory", image(ns, "good", f"{good_server}/good.raw"))[0] == 0
    await condition(kube, Image, "good", ns, timeout=DEADLINE / 2)
    print(f"good image ready {time.monotonic() - started:.1f} s after the endless ones began")
    for i in range(3):
        img = await stalled(kube, f"endless-{i}", ns, timeout=3 * DEADLINE)
        why, message = reason(img)
        assert why == "ImportTimedOut" and f"within {DEADLINE} s" in message


async def test_members_write_specs_but_never_status(project: str) -> None:
    """Status (the verified digest, a snapshot's store reference) is the
    components' word: a member who could write it could point a node at any
    store file."""

    def can(verb: str, resource: str, sub: str = "") -> str:
        extra = [f"--subresource={sub}"] if sub else []
        argv = ["auth", "can-i", verb, resource, *extra, "--as=mallory", "-n", project]
        return kubectl(*argv, check=False).stdout.strip()

    assert can("create", "images.image.nubes.io") == "yes"
    for resource in (
        "images.image.nubes.io",
        "instances.compute.nubes.io",
        "instanceactions.compute.nubes.io",
        "volumes.storage.nubes.io",
    ):
        assert can("patch", resource, "status") == "no", resource


async def test_a_source_names_a_url_or_a_snapshot_not_both(project: str) -> None:
    both = image(project, "both", "http://127.0.0.2/x.raw")
    both["spec"]["source"]["snapshot"] = "snap-1"
    for source in (both["spec"]["source"], {}):
        manifest = image(project, "both", "")
        manifest["spec"]["source"] = source
        rc, err = as_user("mallory", manifest)
        assert rc != 0 and "give exactly one of url and snapshot" in err, err
