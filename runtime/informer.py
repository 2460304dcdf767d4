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
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import ValidationError

from nubes.api.meta import Resource
from nubes.runtime.kube import ApiError, Kube, path_of
from nubes.runtime.store import Store, key_of

log = structlog.get_logger()

RETRY_MAX = 30.0


@dataclass(frozen=True)
class Selector:
    """Which objects of a kind a process caches (None: all of them)."""

    label: str | None = None
    field: str | None = None


class Informer:
    def __init__(
        self,
        kube: Kube,
        kind: type[Resource[Any, Any]],
        store: Store[Any],
        selector: Selector | None = None,
        *,
        watch_timeout: int = 290,
    ):
        self.kube = kube
        self.kind = kind
        self.store = store
        self.selector = selector or Selector()
        self.watch_timeout = watch_timeout
        self.resource_version: str | None = None
        """Where the watch resumes; None: list again first."""
        self.relists = 0
        self.log = log.bind(kind=kind.crd.kind)

    def _parse(self, raw: dict[str, Any]) -> Resource[Any, Any] | None:
        try:
            return self.kind.model_validate(raw)
        except ValidationError as e:
            # One malformed object must not blind the process to the rest.
            meta = raw.get("metadata", {})
            self.log.warning(
                "object not understood",
                key=key_of(meta.get("namespace"), meta.get("name", "?")),
                error=str(e).splitlines()[0],
            )
            return None

    async def list(self) -> None:
        """Load the whole (selected) collection into the store."""
        items, version = await self.kube.list_with_version(
            path_of(self.kind),
            label_selector=self.selector.label,
            field_selector=self.selector.field,
        )
        parsed = [obj for obj in map(self._parse, items) if obj is not None]
        self.store.replace_all(parsed)
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
                self.store.remove(key_of(meta.get("namespace"), meta["name"]))
            elif kind in ("ADDED", "MODIFIED"):
                obj = self._parse(raw)
                if obj is not None:
                    self.store.upsert(obj)
            self.resource_version = meta.get("resourceVersion") or self.resource_version
