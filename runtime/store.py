"""In-memory caches of watched objects, with secondary indexes.

The stores are fed by the watch streams and read by the reconcilers, so that a
converge function looks at related objects without API round trips.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any, Generic, TypeVar

from nubes.api.meta import Resource

R = TypeVar("R", bound=Resource[Any, Any])

Listener = Callable[[Any, Any], None]
"""Called with (old, new); either may be None (added, deleted)."""


def key_of(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def version_of(obj: Resource[Any, Any]) -> int:
    # Opaque by contract, etcd's revision in practice: compared only to keep
    # the newer of two watches' copies of one object, never for anything else.
    rv = obj.metadata.resource_version
    return int(rv) if rv.isdigit() else 0


class Store(Generic[R]):
    """One kind's cache. Several watches may feed it (`source`: one field
    selector each, e.g. a node's ports by host and by DHCP server): an object
    is in the store while any source has it, and the newest copy wins."""

    def __init__(self, kind: type[R]):
        self.kind = kind
        self._items: dict[str, R] = {}
        self._sources: dict[str, set[int]] = {}
        self._index_fns: dict[str, Callable[[R], Iterable[str]]] = {}
        self._indexes: dict[str, defaultdict[str, set[str]]] = {}
        self._listeners: list[Listener] = []
        self.synced = False

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[R]:
        return iter(list(self._items.values()))

    def get(self, key: str) -> R | None:
        return self._items.get(key)

    def lookup(self, name: str, namespace: str | None = None) -> R | None:
        return self._items.get(key_of(namespace, name))

    def add_index(self, name: str, fn: Callable[[R], Iterable[str]]) -> None:
        """Register an index once. The same function again is accepted (a
        helper several reconcilers call); another function under a taken
        name is an error: the last one would silently win for every reader."""
        known = self._index_fns.get(name)
        if known is fn:
            return
        if known is not None:
            raise ValueError(
                f"index {name!r} of {self.kind.crd.kind} is already registered"
                f" ({known.__qualname__}); register it once, where it is owned"
            )
        self._index_fns[name] = fn
        index: defaultdict[str, set[str]] = defaultdict(set)
        for key, obj in self._items.items():
            for value in fn(obj):
                index[value].add(key)
        self._indexes[name] = index

    def by_index(self, name: str, value: str) -> list[R]:
        keys = self._indexes[name].get(value, ())
        return [self._items[k] for k in sorted(keys) if k in self._items]

    def keys_by_index(self, name: str, value: str) -> AbstractSet[str]:
        """The keys under `value` in an index, as a read-only view: no copy,
        for counting and membership in large collections."""
        return self._indexes[name].get(value) or frozenset()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def upsert(self, obj: R, source: int = 0) -> None:
        key = obj.key
        self._sources.setdefault(key, set()).add(source)
        old = self._items.get(key)
        if old is not None and (
            old.metadata.resource_version == obj.metadata.resource_version
            or (old.uid == obj.uid and version_of(old) > version_of(obj))
        ):
            return
        self._unindex(key, old)
        self._items[key] = obj
        for name, fn in self._index_fns.items():
            for value in fn(obj):
                self._indexes[name][value].add(key)
        for listener in self._listeners:
            listener(old, obj)

    def remove(self, key: str, source: int = 0) -> None:
        held = self._sources.get(key)
        if held is not None:
            held.discard(source)
            if held:
                return  # another watch still has it
            del self._sources[key]
        old = self._items.pop(key, None)
        if old is None:
            return
        self._unindex(key, old)
        for listener in self._listeners:
            listener(old, None)

    def replace_all(self, objs: Iterable[R], source: int = 0) -> None:
        """Load a full listing of one source: upsert everything, drop what
        that source no longer has."""
        fresh = {o.key: o for o in objs}
        for key in [k for k, held in self._sources.items() if source in held]:
            if key not in fresh:
                self.remove(key, source)
        for obj in fresh.values():
            self.upsert(obj, source)
        self.synced = True

    def _unindex(self, key: str, old: R | None) -> None:
        if old is None:
            return
        for name, fn in self._index_fns.items():
            index = self._indexes[name]
            for value in fn(old):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]
