"""Shared fixtures. Integration tests talk to the real API server named by
KUBECONFIG (hack/with-cluster.sh sets it); nothing here mocks it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath) or "/drivers/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def kubectl_path() -> str:
    found = shutil.which(
        "kubectl",
        path=os.path.join(
            os.environ.get("NUBES_CACHE", os.path.expanduser("~/.cache/nubes")), "bin"
        ),
    )
    if not found:
        pytest.fail("kubectl not built: run `make tools`")
    return found


def pytest_configure(config: pytest.Config) -> None:
    from nubes.runtime.logging import configure

    configure("warning")
