"""The one error channel: every failure a node reports has a reason listed in
the README's table with the same retry behaviour, and every tier's failure
types carry a Problem."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import nubes.drivers
from nubes.agent.problems import node_problem
from nubes.api.compute import InstanceStatus
from nubes.api.meta import NodeProblem
from nubes.controllers.ipam import IpamError
from nubes.drivers.compute.libvirt import LibvirtFailure
from nubes.drivers.images.cache import ImageFetchError
from nubes.drivers.images.fetch import FetchError
from nubes.drivers.problem import Failure, Problem, fail, problem_of
from nubes.drivers.runner import CommandError
from nubes.runtime.reconcile import Stall, Wait

ROOT = Path(__file__).resolve().parents[2]


def readme_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    body = text.split("<!-- problems -->", 1)[1].split("<!-- /problems -->", 1)[0]
    rows = [line.split("|")[1:-1] for line in body.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[2].strip() for cells in rows[1:]}


def driver_failures() -> list[type[Failure]]:
    for module in pkgutil.walk_packages(nubes.drivers.__path__, "nubes.drivers."):
        importlib.import_module(module.name)
    found: list[type[Failure]] = []
    todo = [Failure]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("nubes.drivers."):
                found.append(sub)
    return found


def named_reasons() -> set[tuple[str, bool]]:
    """Reasons the agent and drivers raise or report by name: fail("R", ...),
    Problem("R", ...)."""
    start = re.compile(r'\b(?:fail|Problem)\(\s*"([A-Za-z0-9]+)"')
    found = set()
    for path in [*(ROOT / "agent").glob("*.py"), *(ROOT / "drivers").rglob("*.py")]:
        text = path.read_text()
        for m in start.finditer(text):
            depth, end = 1, m.end()
            while depth:  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            found.add((m.group(1), "retryable=False" not in text[m.end() : end]))
    return found


def test_every_node_reason_is_in_the_readme_with_its_retry_behaviour() -> None:
    table = readme_table()
    assert "ImageFetchFailed" in table and table["ImageFetchFailed"] == "yes"
    classes = driver_failures()
    assert LibvirtFailure in classes and CommandError in classes
    reasons = {(c.reason, c.retryable) for c in classes} | named_reasons()
    assert ("PortBindingTimeout", True) in reasons and ("ImageNotReady", True) in reasons
    reasons |= {("NodeError", True), ("NodeTimeout", True), ("FileMissing", True)}
    for reason, retryable in sorted(reasons):
        assert reason in table, f"{reason} is not in the README's table of problems"
        if table[reason] != "depends":
            assert table[reason] == ("yes" if retryable else "no"), reason
    unused = set(table) - {r for r, _ in reasons}
    assert not unused, f"README lists reasons nothing reports: {unused}"


def test_one_reason_per_cause_across_kinds() -> None:
    # The node's store copy and the controller's download fail alike.
    assert ImageFetchError.reason == FetchError.reason == "ImageFetchFailed"
    for cls in driver_failures():
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", cls.reason), cls


def test_problems_from_errors() -> None:
    assert problem_of(LibvirtFailure("defining domain d: boom"), "instance vm") == Problem(
        "LibvirtFailed", "instance vm: defining domain d: boom", True
    )
    assert problem_of(FileNotFoundError(2, "gone"), "x").reason == "FileMissing"
    assert problem_of(ValueError()).message == "ValueError"
    assert problem_of(fail("PoolNotServed", "no pool", retryable=False)).retryable is False
    # The controller's own shapes are Failures too.
    stall, wait = Stall("IpAddressExhausted", "full"), Wait("Scheduling", "soon", 5)
    assert problem_of(stall) == Problem("IpAddressExhausted", "full", retryable=False)
    assert problem_of(wait).retryable and wait.retry_after == 5
    assert problem_of(IpamError("InvalidAllocationPool", "overlap")).retryable is False
    with pytest.raises(ValueError, match="CamelCase"):
        Problem("not camel", "x")


def test_node_problem_status_is_the_typed_model() -> None:
    problem = node_problem(Problem("ImageFetchFailed", "gone"), "node-1")
    assert problem is not None
    wire = problem.wire()
    assert wire == {
        "reason": "ImageFetchFailed",
        "message": "gone",
        "retryable": True,
        "node": "node-1",
    }
    assert NodeProblem.model_validate(wire).node == "node-1"
    assert node_problem(None, "node-1") is None


def test_status_writes_are_built_from_the_models() -> None:
    # Only what the writer set; an explicit None clears the field (merge patch).
    status = InstanceStatus(node_problem=None, power_state="Running")
    status.shelved_disk = None
    assert status.patch() == {"nodeProblem": None, "powerState": "Running", "shelvedDisk": None}
