"""List-then-watch of one kind into a Store: the informer of client-go.

Why not kopf's watching (which fed the stores before): kopf re-lists after a
watch expires ("410 Gone") but tells its handlers nothing about where a
listing ends, so an object deleted while the watch was down stayed in the
cache for ever and its allocations leaked. Here every listing replaces the
store (`Store.replace_all` drops what is gone and tells the listeners), the
watch resumes from the last resourceVersion it saw (bookmarks keep it fresh),
and a kind can be narrowed by label or field selector, so a node agent caches
only what concerns its node.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import BaseModel, ValidationError

from nubes.api.meta import Resource
from nubes.runtime.kube import ApiError, Kube, path_of
from nubes.runtime.status_apply import own_status_entry, owned_fields
from nubes.runtime.store import Store, key_of

log = structlog.get_logger()

RETRY_MAX = 30.0


@dataclass(frozen=True)
class Selector:
    """Which objects of a kind a process caches (None: all of them)."""

    label: str | None = None
    field: str | None = None

    def matches_fields(self, raw: dict[str, Any]) -> bool:
        """Whether `raw` satisfies the field selector (equality terms only,
        as the CRDs' selectable fields offer), judged locally."""
        for term in (self.field or "").split(","):
            if not term:
                continue
            path, _, wanted = term.partition("=")
            value: Any = raw
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is None or str(value) != wanted:
                return False
        return True


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
INTERN_MAX = 64


def compact(raw: dict[str, Any], manager: str) -> dict[str, Any]:
    """`raw` as a cache needs it, for memory at scale: of managedFields only
    this process's own status applies (what status_apply reads), reduced to
    their top-level field names; no copy of the last client-side apply; and
    short strings (names, nodes, reasons, timestamps) shared between objects
    rather than repeated in each (interned)."""
    meta = raw.get("metadata")
    if isinstance(meta, dict):
        owned = owned_fields(meta.pop("managedFields", None) or [], manager)
        if owned:
            meta["managedFields"] = [own_status_entry(manager, owned)]
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED, None)
    interned: dict[str, Any] = _interned(raw)
    return interned


def _interned(value: Any) -> Any:
    if isinstance(value, str):
        return sys.intern(value) if len(value) <= INTERN_MAX else value
    if isinstance(value, dict):
        return {sys.intern(k): _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    return value


class ReadOnlyFields(set[str]):
    """The set of fields given to a cached model, shared by every cached model
    with the same fields (pydantic keeps one set per model, 216 to 728 bytes
    each, a third of a small object). A set, as pydantic's serializer needs;
    cached objects are read-only: setting a field of one fails here instead
    of changing the cache."""

    def _refuse(self, *args: Any) -> None:
        raise TypeError(f"cached objects are read-only: copy before setting {args!r}")

    add = update = discard = remove = pop = clear = _refuse  # type: ignore[assignment]
    __ior__ = __iand__ = __isub__ = __ixor__ = _refuse  # type: ignore[assignment]

    # A copy (model_copy) is the caller's own, to change at will.
    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> set[str]:
        return set(self)


_FIELD_SETS: dict[frozenset[str], ReadOnlyFields] = {}


def share_field_sets(model: BaseModel) -> None:
    """Give `model` and the models inside it shared read-only field sets."""
    names = frozenset(model.__pydantic_fields_set__)
    shared = _FIELD_SETS.get(names)
    if shared is None:
        shared = _FIELD_SETS[names] = ReadOnlyFields(names)
    object.__setattr__(model, "__pydantic_fields_set__", shared)
    for value in model.__dict__.values():
        if isinstance(value, BaseModel):
            share_field_sets(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    share_field_sets(item)
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, BaseModel):
                    share_field_sets(item)


class Informer:
    def __init__(
        self,
        kube: Kube,
        kind: type[Resource[Any, Any]],
        store: Store[Any],
        selector: Selector | None = None,
        *,
        source: int = 0,
        siblings: tuple[tuple[int, Selector], ...] = (),
        watch_timeout: int = 290,
    ):
        self.kube = kube
        self.kind = kind
        self.store = store
        self.selector = selector or Selector()
        self.source = source
        """This watch's number in the store; `siblings` are the other watches
        feeding it, by number and field selector."""
        self.siblings = siblings
        self.watch_timeout = watch_timeout
        self.resource_version: str | None = None
        """Where the watch resumes; None: list again first."""
        self.relists = 0
        self.log = log.bind(kind=kind.crd.kind)

    def _parse(self, raw: dict[str, Any]) -> Resource[Any, Any] | None:
        try:
            obj = self.kind.model_validate(compact(raw, self.kube.field_manager))
        except ValidationError as e:
            # One malformed object must not blind the process to the rest.
            meta = raw.get("metadata", {})
            self.log.warning(
                "object not understood",
                key=key_of(meta.get("namespace"), meta.get("name", "?")),
                error=str(e).splitlines()[0],
            )
            return None
        share_field_sets(obj)
        return obj

    async def list(self) -> None:
        """Load the whole (selected) collection into the store."""
        parsed, version = await self.kube.list_with_version(
            path_of(self.kind),
            self._parse,
            label_selector=self.selector.label,
            field_selector=self.selector.field,
        )
        self.store.replace_all(parsed, self.source)
        self.resource_version = version
        self.relists += 1

    async def run(self) -> None:
        """List when needed, watch, and start over for ever; errors only
        delay the next attempt."""
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self.list()
                await self._watch()
                failures = 0
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status == 410:
                    self.resource_version = None
                    continue
                failures += 1
                await self._pause(failures, str(e))
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, OSError) as e:
                failures += 1
                await self._pause(failures, str(e) or type(e).__name__)

    async def _left(self, raw: dict[str, Any]) -> None:
        """An object was deleted, or changed so that this watch no longer
        selects it. The event carries the object as it was (the API server
        sends the last state the selector matched), so where the object went
        is read again when other watches feed the store: if one of them (or
        this one again) selects it now, it stays, handed over at once. That
        watch's own event may come later, and a moment's absence would read
        as a deletion (a compute agent would tear down a guest that just
        moved in)."""
        meta = raw.get("metadata", {})
        name, namespace = meta["name"], meta.get("namespace")
        key = key_of(namespace, name)
        if self.siblings and self.store.get(key) is not None:
            try:
                now = await self.kube.get_raw(path_of(self.kind), name, namespace)
            except ApiError as e:
                self.log.warning("object not read again", key=key, error=str(e))
                now = None
            watches = ((self.source, self.selector), *self.siblings) if now is not None else ()
            for source, selector in watches:
                if now is not None and selector.matches_fields(now):
                    obj = self._parse(now)
                    if obj is not None:
                        self.store.upsert(obj, source)
                        if source == self.source:
                            return
                    break
        self.store.remove(key, self.source)

    async def _pause(self, failures: int, error: str) -> None:
        delay = min(RETRY_MAX, 0.25 * 2**failures)
        self.log.warning("watch failed", error=error, retry_in=delay)
        await asyncio.sleep(delay)

    async def _watch(self) -> None:
        assert self.resource_version is not None
        async for event in self.kube.watch_raw(
            path_of(self.kind),
            self.resource_version,
            label_selector=self.selector.label,
            field_selector=self.selector.field,
            timeout=self.watch_timeout,
        ):
            kind = event.get("type")
            raw = event.get("object") or {}
            if kind == "ERROR":
                if raw.get("code") == 410:
                    self.resource_version = None  # expired: list again
                    return
                raise ApiError(int(raw.get("code") or 500), raw)
            meta = raw.get("metadata", {})
            if kind == "DELETED":
                await self._left(raw)
            elif kind in ("ADDED", "MODIFIED"):
                obj = self._parse(raw)
                if obj is not None:
                    self.store.upsert(obj, self.source)
            self.resource_version = meta.get("resourceVersion") or self.resource_version
