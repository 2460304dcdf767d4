"""The runtime shared by the controller and the node agent.

An informer per kind lists and watches it into a store (runtime/informer.py);
store changes queue keys for the reconcilers; workers take keys, run the
converge function against the latest cached object and write status only
when it changed. Finalizers and status are written with optimistic
concurrency.

(Somewhat over 400 lines: wiring, workers, node loops and status writes all
work on the one registry of stores and queues this class holds.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from nubes.api.meta import Resource
from nubes.runtime import health, status_apply
from nubes.runtime.health import (
    OBJECTS,
    QUEUE_DEPTH,
    RECONCILE_SECONDS,
    RECONCILES,
    STATUS_CONFLICTS,
    STATUS_WRITES,
)
from nubes.runtime.informer import Informer, Selector
from nubes.runtime.kube import ApiError, Kube
from nubes.runtime.reconcile import (
    Outcome,
    Reconciler,
    Stall,
    Wait,
    conditions_for,
    same_conditions,
)
from nubes.runtime.store import Store
from nubes.runtime.workqueue import WorkQueue

log = structlog.get_logger()


@dataclass
class _Registered:
    reconciler: Reconciler[Any]
    queue: WorkQueue


class Operator:
    """One process's set of stores and reconcilers."""

    def __init__(
        self,
        name: str,
        kube: Kube,
        *,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        shard: int = 0,
        shards: int = 1,
    ):
        self.name = name
        self.kube = kube
        self.shard = shard
        self.shards = shards
        self.health_port = health_port
        self.health_host = health_host
        self.stores: dict[type[Resource[Any, Any]], Store[Any]] = {}
        self.selectors: dict[type[Resource[Any, Any]], tuple[Selector, ...]] = {}
        self.informers: list[Informer] = []
        self._registered: dict[type[Resource[Any, Any]], _Registered] = {}
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._periodic: list[tuple[float, Callable[[], Awaitable[None]]]] = []
        self._loops: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        # Quiescing (a node agent's teardown on uninstall): no loop pass,
        # periodic job or reconcile runs any more but of the kinds kept, and
        # quiesce() returns once none of them is in flight. There is no way
        # back short of a restart: what the passes built may be gone.
        self._keep: frozenset[object] | None = None
        self._busy: collections.Counter[object] = collections.Counter()
        self._idle = asyncio.Condition()
        self.log = log.bind(process=name)

    # --- wiring -------------------------------------------------------------------

    def store(self, kind: type[Resource[Any, Any]]) -> Store[Any]:
        if kind not in self.stores:
            self.stores[kind] = Store(kind)
        return self.stores[kind]

    def select(self, kind: type[Resource[Any, Any]], *selectors: Selector) -> None:
        """Cache only the objects of `kind` that match any of `selectors`
        (one watch each; set before running)."""
        self.store(kind)
        self.selectors[kind] = selectors

    def register(self, reconciler: Reconciler[Any]) -> None:
        kind = reconciler.kind
        queue = WorkQueue(kind.crd.kind)
        self._registered[kind] = _Registered(reconciler, queue)
        store = self.store(kind)
        store.add_listener(lambda old, new: queue.add((new or old).key))
        reconciler.setup(self)

    def watch(
        self,
        kind: type[Resource[Any, Any]],
        target: type[Resource[Any, Any]],
        mapper: Callable[[Any], Iterable[str]],
        *,
        when: Callable[[Any, Any], bool] | None = None,
    ) -> None:
        """When an object of `kind` changes (and `when(old, new)` holds), queue
        the `target` keys it maps to."""

        def on_change(old: Any, new: Any) -> None:
            if when is not None and not when(old, new):
                return
            queue = self._registered[target].queue
            keys: set[str] = set()
            for obj in (old, new):
                if obj is not None:
                    keys.update(mapper(obj))
            for key in keys:
                queue.add(key)

        self.store(kind).add_listener(on_change)

    def owns_shard(self, uid: str) -> bool:
        """Whether this worker's shard holds the object with this uid."""
        if self.shards == 1:
            return True
        bucket = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % self.shards
        return bucket == self.shard

    def loop(
        self,
        name: str,
        sync: Callable[[bool], Awaitable[None]],
        kinds: Iterable[type[Resource[Any, Any]]],
        *,
        resync: float = 30.0,
        debounce: float = 0.05,
    ) -> Callable[[], None]:
        """A whole-node converge function: run `sync(full)` after any change
        to the given kinds (changes within `debounce` are merged) and every
        `resync` seconds with full=True, to repair drift. Returns a function
        (for the event loop's thread) that asks for a pass now, for changes
        on the node the watched kinds do not show."""
        dirty = asyncio.Event()
        dirty.set()  # converge once at start: re-adopt what exists
        for kind in kinds:
            self.store(kind).add_listener(lambda old, new: dirty.set())

        async def run() -> None:
            failures = 0
            while True:
                try:
                    await asyncio.wait_for(dirty.wait(), timeout=resync)
                    full = False
                except TimeoutError:
                    full = True
                await asyncio.sleep(debounce)
                dirty.clear()
                started = time.monotonic()
                try:
                    async with self._running(f"loop:{name}") as go:
                        if go:
                            await sync(full)
                    failures = 0
                    RECONCILES.labels(self.name, name, "observed").inc()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    failures += 1
                    delay = min(30.0, 0.2 * 2**failures)
                    self.log.warning(
                        "loop failed",
                        loop=name,
                        error=str(e) or type(e).__name__,
                        retry_in=delay,
                        exc_info=True,
                    )
                    RECONCILES.labels(self.name, name, "error").inc()
                    await asyncio.sleep(delay)
                    dirty.set()
                RECONCILE_SECONDS.labels(self.name, name).observe(time.monotonic() - started)

        self._loops.append((name, run))
        return dirty.set

    def every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` periodically once started (level-based clean-ups)."""
        self._periodic.append((seconds, job))

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run once after the caches are loaded, before reconciling starts."""
        self._on_start.append(hook)

    def enqueue(self, kind: type[Resource[Any, Any]], key: str, after: float = 0) -> None:
        queue = self._registered[kind].queue
        if after:
            queue.add_after(key, after)
        else:
            queue.add(key)

    # --- running ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._initial_sync()
        for hook in self._on_start:
            await hook()
        for informer in self.informers:
            name = f"watch-{informer.kind.crd.plural}-{informer.source}"
            self._tasks.append(asyncio.create_task(informer.run(), name=name))
        for kind, reg in self._registered.items():
            for key in [o.key for o in self.stores[kind]]:
                reg.queue.add(key)
            for i in range(reg.reconciler.workers):
                self._tasks.append(
                    asyncio.create_task(self._worker(kind, reg), name=f"{kind.crd.kind}-{i}")
                )
        for name, run in self._loops:
            self._tasks.append(asyncio.create_task(run(), name=f"loop-{name}"))
        for seconds, job in self._periodic:
            self._tasks.append(
                asyncio.create_task(self._repeat(seconds, job), name=f"every-{seconds}")
            )
        runner = await self._serve_health() if self.health_port is not None else None
        self._ready.set()
        self.log.info("operator started", kinds=[k.crd.kind for k in self._registered])
        try:
            await stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for reg in self._registered.values():
                reg.queue.close()
            if runner is not None:
                await runner.cleanup()
            self.log.info("operator stopped")

    async def quiesce(self, keep: Iterable[type[Resource[Any, Any]]]) -> None:
        """Stop every loop, periodic job and reconciler but those of `keep`,
        and wait until none of the stopped ones is running."""
        self._keep = frozenset(keep)
        async with self._idle:
            await self._idle.wait_for(
                lambda: not any(n for w, n in self._busy.items() if self._held(w))
            )
        self.log.info("quiesced", kept=[k.crd.kind for k in keep])

    def _held(self, what: object) -> bool:
        return self._keep is not None and what not in self._keep

    @contextlib.asynccontextmanager
    async def _running(self, what: object) -> AsyncIterator[bool]:
        """Yields whether `what` may run now; counts it as in flight."""
        if self._held(what):
            yield False
            return
        self._busy[what] += 1
        try:
            yield True
        finally:
            self._busy[what] -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _repeat(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                async with self._running("every") as go:
                    if go:
                        await job()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.log.warning(
                    "periodic job failed", job=getattr(job, "__name__", "?"), error=str(e)
                )

    async def _initial_sync(self) -> None:
        """List every watched kind before reconciling anything, so converge
        functions never mistake a not-yet-loaded cache for an absent object."""
        for kind, store in self.stores.items():
            selectors = self.selectors.get(kind) or (Selector(),)
            numbered = tuple(enumerate(selectors))
            informers = [
                Informer(
                    self.kube,
                    kind,
                    store,
                    selector,
                    source=source,
                    siblings=tuple((n, sel) for n, sel in numbered if n != source),
                )
                for source, selector in numbered
            ]
            try:
                for informer in informers:
                    await self._first_list(informer)
            except ApiError as e:
                if e.status != 400 or kind not in self.selectors:
                    raise
                # An API server without the CRDs' selectable fields (before
                # Kubernetes 1.31) refuses the field selectors: cache it all.
                self.log.warning(
                    "field selectors refused, caching every object",
                    kind=kind.crd.kind,
                    error=str(e),
                )
                informers = [Informer(self.kube, kind, store)]
                await self._first_list(informers[0])
            self.informers += informers
            gauge = OBJECTS.labels(self.name, kind.crd.kind)
            gauge.set(len(store))
            store.add_listener(_count_into(gauge, store))

    async def _first_list(self, informer: Informer) -> None:
        for attempt in range(60):
            try:
                await informer.list()
                return
            except ApiError as e:
                if e.status != 404 or attempt == 59:
                    raise
                self.log.warning("waiting for CRD", kind=informer.kind.crd.kind)
                await asyncio.sleep(1)

    async def _worker(self, kind: type[Resource[Any, Any]], reg: _Registered) -> None:
        queue = reg.queue
        while True:
            key = await queue.get()
            QUEUE_DEPTH.labels(self.name, kind.crd.kind).set(len(queue))
            try:
                async with self._running(kind) as go:
                    if go:
                        await self._process(kind, reg, key)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.not_found:
                    # Deleted meanwhile; the watch removes it from the cache.
                    queue.forget(key)
                    continue
                if e.conflict:
                    # Acted on an outdated cached object; the watch brings the
                    # new version, and a retry picks it up.
                    queue.add_after(key, 0.05)
                    RECONCILES.labels(self.name, kind.crd.kind, "conflict").inc()
                    continue
                delay = queue.retry(key)
                self.log.warning(
                    "reconcile failed",
                    kind=kind.crd.kind,
                    key=key,
                    error=str(e),
                    retry_in=round(delay, 2),
                )
                RECONCILES.labels(self.name, kind.crd.kind, "error").inc()
            except Exception as e:
                delay = queue.retry(key)
                self.log.warning(
                    "reconcile failed",
                    kind=kind.crd.kind,
                    key=key,
                    error=str(e) or type(e).__name__,
                    retry_in=round(delay, 2),
                    exc_info=True,
                )
                RECONCILES.labels(self.name, kind.crd.kind, "error").inc()
            finally:
                queue.done(key)

    async def _process(self, kind: type[Resource[Any, Any]], reg: _Registered, key: str) -> None:
        reconciler = reg.reconciler
        obj = self.stores[kind].get(key)
        if obj is None:
            await reconciler.forget(key)
            reg.queue.forget(key)
            return
        if not reconciler.accepts(obj):
            return
        started = time.monotonic()
        finalizer = reconciler.finalizer
        if obj.deleting:
            if finalizer is not None and finalizer not in obj.metadata.finalizers:
                return
            outcome = await self._guarded(reconciler.finalize, obj)
            if outcome is None:
                if finalizer is not None:
                    await self.kube.set_finalizers(
                        obj, [f for f in obj.metadata.finalizers if f != finalizer]
                    )
                    self.log.info("finalized", kind=kind.crd.kind, key=key)
            else:
                await self._write_status(obj, outcome)
                reg.queue.add_after(key, outcome.requeue_after or 2.0)
            return
        if finalizer and finalizer not in obj.metadata.finalizers:
            # The watch delivers the updated object and queues it again.
            await self.kube.set_finalizers(obj, [*obj.metadata.finalizers, finalizer])
            return
        outcome = await self._guarded(reconciler.converge, obj)
        assert outcome is not None
        await self._write_status(obj, outcome)
        reg.queue.forget(key)
        if outcome.requeue_after:
            reg.queue.add_after(key, outcome.requeue_after)
        RECONCILES.labels(self.name, kind.crd.kind, outcome.state or "observed").inc()
        RECONCILE_SECONDS.labels(self.name, kind.crd.kind).observe(time.monotonic() - started)

    @staticmethod
    async def _guarded(fn: Callable[[Any], Any], obj: Any) -> Outcome | None:
        try:
            result: Outcome | None = await fn(obj)
            return result
        except Stall as s:
            return Outcome.stalled(s.reason, s.message)
        except Wait as w:
            return Outcome.progressing(w.reason, w.message, requeue_after=w.retry_after or 5.0)

    async def _write_status(self, obj: Resource[Any, Any], outcome: Outcome) -> None:
        current = obj.status.wire()
        # Compared as the API server keeps them (no nested Nones), so a value
        # with one is not written again on every pass.
        patch = {
            k: v for k, v in outcome.status.items() if current.get(k) != status_apply.present(v)
        }
        if outcome.state is not None:
            conditions = conditions_for(outcome, obj.status.conditions, obj.generation)
            if not same_conditions(obj.status.conditions, conditions):
                patch["conditions"] = conditions
            if current.get("observedGeneration") != obj.generation:
                patch["observedGeneration"] = obj.generation
            if outcome.state != "ready" and (
                not obj.status.is_true((outcome.state == "stalled" and "Stalled") or "Reconciling")
                or obj.status.condition("Ready") is None
            ):
                self.log.info(
                    "not ready",
                    kind=obj.crd.kind,
                    key=obj.key,
                    state=outcome.state,
                    reason=outcome.reason,
                    message=outcome.message,
                )
        if not patch:
            return
        try:
            # Never write status computed from an outdated view of the object:
            # the write fails and the newer version is reconciled instead.
            if not await status_apply.apply_status(self.kube, obj, patch):
                return
        except status_apply.OwnedElsewhere as e:
            # A bug in the writers, not in the object: say so and leave the
            # other writer's field alone.
            self.log.error("status write refused", kind=obj.crd.kind, key=obj.key, error=str(e))
            STATUS_CONFLICTS.labels(self.name, obj.crd.kind).inc()
            return
        STATUS_WRITES.labels(self.name, obj.crd.kind).inc()

    # --- health and metrics ----------------------------------------------------------

    def _problems(self) -> dict[str, Any]:
        dead = [t.get_name() for t in self._tasks if t.done()]
        unsynced = [k.crd.kind for k, s in self.stores.items() if not s.synced]
        return {"dead": dead, "unsynced": unsynced} if dead or unsynced else {}

    def _count_queues(self) -> None:
        for kind, reg in self._registered.items():
            QUEUE_DEPTH.labels(self.name, kind.crd.kind).set(len(reg.queue))

    async def _serve_health(self) -> web.AppRunner:
        assert self.health_port is not None
        runner = await health.serve(
            self.health_host, self.health_port, self._problems, self._count_queues
        )
        self.log.info(
            "health endpoint", url=f"http://{self.health_host}:{self.health_port}/healthz"
        )
        return runner


def _count_into(gauge: Any, store: Store[Any]) -> Callable[[Any, Any], None]:
    def count(_old: Any, _new: Any) -> None:
        gauge.set(len(store))

    return count
