"""One store fed by several watches (a node agent's ports by host and by DHCP
server): an object stays while any watch has it, moves between watches
without a moment's absence, and a deletion seen by both goes for good."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nubes.api.network import Port
from nubes.runtime.informer import Informer, Selector
from nubes.runtime.kube import ApiError
from nubes.runtime.operator import Operator
from nubes.runtime.store import Store

BY_HOST = Selector(field="status.host=n1")
BY_DHCP = Selector(field="status.dhcpNode=n1")


def port(rv: int, host: str | None, dhcp: str | None, name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "network.nubes.io/v1alpha1",
        "kind": "Port",
        "metadata": {
            "name": name,
            "namespace": "t",
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
        },
        "spec": {"network": {"name": "n"}},
        "status": {"host": host, "dhcpNode": dhcp},
    }


class Fake:
    """The API server as the watches' re-reads see it."""

    field_manager = "nubes-agent-n1"

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    async def get_raw(self, _kp: Any, name: str, _ns: str | None = None) -> Any:
        return self.objects.get(name)


def watches() -> tuple[Store[Port], Informer, Informer, Fake, list[tuple[Any, Any]]]:
    store: Store[Port] = Store(Port)
    events: list[tuple[Any, Any]] = []
    store.add_listener(
        lambda old, new: events.append(
            (old and old.metadata.resource_version, new and new.metadata.resource_version)
        )
    )
    api = Fake()
    kube: Any = api
    host = Informer(kube, Port, store, BY_HOST, source=0, siblings=((1, BY_DHCP),))
    dhcp = Informer(kube, Port, store, BY_DHCP, source=1, siblings=((0, BY_HOST),))
    return store, host, dhcp, api, events


def added(informer: Informer, raw: dict[str, Any]) -> None:
    obj = informer._parse(raw)
    assert obj is not None
    informer.store.upsert(obj, informer.source)


def test_selector_matches_locally() -> None:
    assert BY_HOST.matches_fields(port(1, "n1", None))
    assert not BY_HOST.matches_fields(port(1, "n2", "n1"))
    assert not BY_HOST.matches_fields(port(1, None, None))
    assert Selector().matches_fields(port(1, None, None))
    assert Selector(field="status.host=n1,status.dhcpNode=n1").matches_fields(port(1, "n1", "n1"))


async def test_moving_between_watches_is_never_a_deletion() -> None:
    store, host, dhcp, api, events = watches()
    added(host, port(10, "n1", "n2"))
    # Re-bound elsewhere while this node's DHCP server now serves it: the host
    # watch says "deleted" (with the state it last matched) first, the DHCP
    # watch's "added" comes later.
    api.objects["p"] = port(11, "n2", "n1")
    await host._left(port(11, "n1", "n2"))
    assert store.lookup("p", "t") is not None
    added(dhcp, port(11, "n2", "n1"))
    assert [e for e in events if e[1] is None] == []
    # Then it leaves the node for good.
    api.objects["p"] = port(12, "n2", "n3")
    await dhcp._left(port(12, "n2", "n1"))
    assert store.lookup("p", "t") is None
    assert events[-1][1] is None


async def test_leaving_and_coming_back_to_the_same_watch_stays() -> None:
    store, host, _, api, events = watches()
    added(host, port(10, "n1", None))
    api.objects["p"] = port(12, "n1", None)  # moved away and back meanwhile
    await host._left(port(11, "n1", None))
    cached = store.lookup("p", "t")
    assert cached is not None and cached.metadata.resource_version == "12"
    assert [e for e in events if e[1] is None] == []


async def test_a_deletion_seen_by_both_watches_goes_for_good() -> None:
    store, host, dhcp, _, _ = watches()
    added(host, port(10, "n1", "n1"))
    added(dhcp, port(10, "n1", "n1"))
    await host._left(port(20, "n1", "n1"))
    assert store.lookup("p", "t") is not None  # the DHCP watch still has it
    await dhcp._left(port(20, "n1", "n1"))
    assert store.lookup("p", "t") is None


def test_an_older_copy_from_the_slower_watch_never_replaces_a_newer_one() -> None:
    store, host, dhcp, _, _ = watches()
    added(host, port(10, "n1", "n1"))
    added(host, port(12, "n1", "n1"))
    added(dhcp, port(10, "n1", "n1"))
    cached = store.lookup("p", "t")
    assert cached is not None and cached.metadata.resource_version == "12"


def test_a_relisting_drops_only_what_that_watch_had() -> None:
    store, host, dhcp, _, _ = watches()
    added(host, port(10, "n1", None, name="a"))
    added(dhcp, port(10, "n2", "n1", name="b"))
    added(host, port(10, "n1", "n1", name="c"))
    added(dhcp, port(10, "n1", "n1", name="c"))
    store.replace_all([], source=0)
    assert {p.name for p in store} == {"b", "c"}


class OldApiServer(Fake):
    """An API server without CRD selectable fields: field selectors refused."""

    def __init__(self) -> None:
        super().__init__()
        self.lists: list[str | None] = []

    async def list_with_version(
        self,
        _kp: Any,
        parse: Callable[[dict[str, Any]], Any],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Any], str]:
        self.lists.append(field_selector)
        if field_selector:
            raise ApiError(400, {"reason": "BadRequest", "message": "field label not supported"})
        return [parse(port(5, "n1", None, name="a")), parse(port(6, "n2", None, name="b"))], "7"


async def test_without_selectable_fields_the_whole_kind_is_cached() -> None:
    api = OldApiServer()
    op = Operator("agent-n1", api)  # type: ignore[arg-type]
    op.select(Port, BY_HOST, BY_DHCP)
    await op._initial_sync()
    assert api.lists == ["status.host=n1", None]
    assert sorted(p.name for p in op.store(Port)) == ["a", "b"]
    assert [i.selector for i in op.informers] == [Selector()]
