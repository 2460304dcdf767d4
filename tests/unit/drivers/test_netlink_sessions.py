"""Netlink sessions (drivers/network/netns.py): one socket per namespace for
a whole operation, every one closed when it ends, whatever happened."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nubes.drivers.network import netns
from nubes.drivers.network.netns import _ipr, one_socket_per_namespace


class FakeIPRoute:
    opened: list[FakeIPRoute] = []

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.closed = False
        FakeIPRoute.opened.append(self)

    def close(self) -> None:
        self.closed = True
        if self.netns == "bad-close":
            raise OSError("close failed")


@pytest.fixture(autouse=True)
def fake_netlink(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("n1", "n2", "bad-close"):
        (tmp_path / name).touch()
    monkeypatch.setattr(netns, "NETNS_DIR", str(tmp_path))
    monkeypatch.setattr(netns, "IPRoute", FakeIPRoute)
    FakeIPRoute.opened = []


def socket_in(namespace: str | None) -> Any:
    with _ipr(namespace) as ipr:
        return ipr


@one_socket_per_namespace
def inner(namespace: str | None) -> Any:
    return socket_in(namespace)


@one_socket_per_namespace
def outer() -> list[Any]:
    return [inner("n1"), socket_in("n1"), inner("n2"), inner(None), socket_in(None)]


def test_nested_calls_share_one_socket_per_namespace_closed_at_the_end() -> None:
    got = outer()
    assert got[0] is got[1] and got[3] is got[4]
    assert len({id(s) for s in got}) == 3
    assert len(FakeIPRoute.opened) == 3
    assert all(s.closed for s in FakeIPRoute.opened)


def test_every_socket_closes_and_the_calls_own_error_survives_a_failed_close() -> None:
    @one_socket_per_namespace
    def failing() -> None:
        socket_in("bad-close")
        socket_in("n1")
        socket_in(None)
        raise ValueError("the real error")

    with pytest.raises(ValueError, match="the real error"):
        failing()
    assert [s.closed for s in FakeIPRoute.opened] == [True, True, True]
    # The next session starts afresh.
    assert inner("n1") is not FakeIPRoute.opened[1]


def test_a_missing_namespace_is_never_created() -> None:
    with pytest.raises(netns.LinkError, match="no network namespace gone"):
        inner("gone")
    assert FakeIPRoute.opened == []


def test_threads_do_not_share_sockets() -> None:
    seen: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    @one_socket_per_namespace
    def in_thread(name: str) -> None:
        seen[name] = socket_in("n1")
        barrier.wait(timeout=5)
        assert not seen[name].closed

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"] is not seen["b"]
    assert seen["a"].closed and seen["b"].closed


def test_generators_and_coroutines_are_refused() -> None:
    def generator() -> Iterator[int]:
        yield 1

    async def coroutine() -> None:
        return None

    with pytest.raises(TypeError):
        one_socket_per_namespace(generator)
    with pytest.raises(TypeError):
        one_socket_per_namespace(coroutine)
