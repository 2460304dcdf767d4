"""Image imports run beside the reconcile workers, never on them.

A fetch can take as long as the operator's deadline allows; run on a
reconcile worker, two slow sources would hold every image behind them. Here
each import is a task on its own thread pool, with at most `per_source`
imports from one source host at once, so an endless or trickling server
delays only the images that name it. The reconciler starts an import, gets
`None` (still running) until it ends, and is requeued when it does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from nubes.drivers.images.store import StoredImage

log = structlog.get_logger()


@dataclass(frozen=True)
class Finished:
    stored: StoredImage | None
    error: Exception | None


class ImportPool:
    def __init__(self, parallel: int = 4, per_source: int = 2) -> None:
        self.parallel = parallel
        self.per_source = per_source
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sources: dict[str, asyncio.Semaphore] = {}
        self._running: dict[str, asyncio.Task[Finished]] = {}

    def poll(self, uid: str) -> Finished | None:
        """The import's result once it ended (then forgotten), else None."""
        task = self._running.get(uid)
        if task is None or not task.done():
            return None
        del self._running[uid]
        return task.result()

    def running(self, uid: str) -> bool:
        return uid in self._running

    def start(
        self,
        uid: str,
        source: str,
        job: Callable[[], StoredImage],
        done: Callable[[], None],
    ) -> None:
        """Run `job` (blocking) for image `uid`, fetching from `source` (a host
        name, or "store"); `done` is called in the event loop when it ends."""
        if uid in self._running:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.parallel, thread_name_prefix="image-import"
            )
        task = asyncio.create_task(self._run(source, job))
        task.add_done_callback(lambda _: done())
        self._running[uid] = task

    async def _run(self, source: str, job: Callable[[], StoredImage]) -> Finished:
        slot = self._sources.setdefault(source, asyncio.Semaphore(self.per_source))
        async with slot:
            loop = asyncio.get_running_loop()
            try:
                return Finished(await loop.run_in_executor(self._executor, job), None)
            except Exception as e:  # reported on the image by the reconciler
                return Finished(None, e)

    def cancel(self, uid: str) -> None:
        """Forget an import (the image is being deleted); a fetch already
        running ends at its deadline and its file is removed then."""
        task = self._running.pop(uid, None)
        if task is not None:
            task.cancel()
