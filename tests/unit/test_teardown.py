"""An uninstall's node teardown, the pure parts: which objects keep a node
from being torn down (agent/teardown.py), what of the state directory goes,
and how the pre-delete hook reads the agents' answers (runtime/teardown.py).
The whole path runs in tests/integration/test_helm_install.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nubes.agent.config import AgentConfig
from nubes.agent.teardown import ANNOTATION as AGENT_ANNOTATION
from nubes.agent.teardown import answer, blocking, clear_dir, kept_dirs
from nubes.api.compute import Hypervisor, Instance
from nubes.api.meta import ObjectMeta, now_rfc3339
from nubes.api.network import Network, Port
from nubes.api.storage import Volume
from nubes.runtime.operator import Operator
from nubes.runtime.teardown import ANNOTATION, progress, silent


def _obj(kind: type[Any], name: str, status: dict[str, Any]) -> Any:
    """Only metadata and status matter here (no valid spec needed)."""
    status_model = kind.model_fields["status"].annotation
    return kind.model_construct(
        metadata=ObjectMeta(name=name, namespace="p"),
        status=status_model.model_validate(status),
    )


def _hv(name: str, *, beat: str | None = None, teardown: dict[str, Any] | None = None) -> Any:
    status: dict[str, Any] = {"heartbeatTime": beat or now_rfc3339()}
    if teardown:
        status["teardown"] = teardown
    return _obj(Hypervisor, name, status)


def test_objects_tied_to_the_node_block_it() -> None:
    objects = [
        _obj(Instance, "vm", {"node": "n1"}),
        _obj(Port, "bound", {"host": "n1"}),
        _obj(Port, "elsewhere", {"host": "n2"}),
        _obj(Network, "net", {"dhcpNode": "n1"}),
        _obj(Volume, "vol", {"node": "n1"}),
        _obj(Volume, "unplaced", {}),
    ]
    assert blocking("n1", objects) == [
        "Instance p/vm",
        "Network p/net",
        "Port p/bound",
        "Volume p/vol",
    ]
    assert blocking("n3", objects) == []


def test_the_answer_names_the_blockers() -> None:
    assert answer("r1", []) is None
    many = [f"Port p/{i:02}" for i in range(12)]
    report = answer("r1", many)
    assert report is not None and report.state == "Blocked" and report.request == "r1"
    assert "Port p/00" in report.message and report.message.endswith("and 2 more")


def test_state_dir_is_emptied_but_users_data_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "images").mkdir(parents=True)
    (state / "images" / "img-1").write_text("guest image")  # Image objects outlive the release
    (state / "backups").mkdir()  # empty backup store: goes
    (state / "_base").mkdir()
    (state / "_base" / "abc").write_text("cache")
    (state / "dhcp" / "net-1").mkdir(parents=True)
    (state / "lock").write_text("")
    config = AgentConfig(node="n1", state_dir=str(state), image_store=str(state / "images"))
    removed = clear_dir(state, kept_dirs(config))
    assert sorted(p.name for p in state.iterdir()) == ["images"]
    assert (state / "images" / "img-1").exists()
    assert str(state / "backups") in removed and str(state / "_base") in removed
    # Elsewhere (the chart's layout), nothing of the state directory stays.
    config = AgentConfig(node="n1", state_dir=str(state), image_store=str(tmp_path / "store"))
    clear_dir(state, kept_dirs(config))
    assert list(state.iterdir()) == []
    assert clear_dir(tmp_path / "absent", set()) == []


def test_the_hook_reads_every_answer() -> None:
    assert ANNOTATION == AGENT_ANNOTATION
    done = {"request": "r1", "state": "Done"}
    old = {"request": "r0", "state": "Done"}
    hvs = [
        _hv("a", teardown=done),
        _hv("b", teardown=old),  # answered an earlier request: still waiting
        _hv("c", beat="2020-01-01T00:00:00Z"),
    ]
    dead = silent(hvs)
    assert dead == {"c"}
    p = progress(hvs, "r1", dead)
    assert (p.done, p.waiting, p.dead, p.blocked) == (["a"], ["b"], ["c"], {})
    hvs[1] = _hv("b", teardown={"request": "r1", "state": "Blocked", "message": "still in use"})
    p = progress(hvs, "r1", dead)
    assert p.blocked == {"b": "still in use"} and not p.waiting


async def test_quiesce_waits_for_passes_in_flight_and_holds_the_rest() -> None:
    """The agent tears down only once no loop pass, periodic job or
    reconcile but its Hypervisor's runs, and none starts afterwards."""
    op = Operator("agent-test", kube=None)  # type: ignore[arg-type]
    release = asyncio.Event()
    ran: list[str] = []

    async def pass_in_flight() -> None:
        async with op._running("loop:networking") as go:
            assert go
            await release.wait()
            ran.append("pass")

    task = asyncio.create_task(pass_in_flight())
    await asyncio.sleep(0)
    quiesced = asyncio.create_task(op.quiesce(keep=[Hypervisor]))
    await asyncio.sleep(0.05)
    assert not quiesced.done()  # the pass is still running
    release.set()
    await asyncio.wait_for(quiesced, 5)
    await task
    assert ran == ["pass"]
    async with op._running("loop:networking") as go:
        assert not go
    async with op._running(Instance) as go:
        assert not go
    async with op._running(Hypervisor) as go:
        assert go
