"""A keyed work queue with de-duplication, delayed retries and backoff.

Semantics follow client-go's workqueue: a key queued several times before a
worker takes it is processed once; a key queued while it is being processed
is processed again afterwards; the same key is never processed by two workers
at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class WorkQueue:
    def __init__(self, name: str, *, base_delay: float = 0.2, max_delay: float = 60.0):
        self.name = name
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._base = base_delay
        self._max = max_delay
        self.last_activity = time.monotonic()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue later; an earlier add() supersedes the timer."""
        if delay <= 0:
            self.add(key)
            return
        existing = self._timers.get(key)
        loop = asyncio.get_running_loop()
        if existing is not None and existing.when() <= loop.time() + delay:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: str) -> float:
        """Queue again with exponential backoff; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = float(min(self._max, self._base * (2**failures)))
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset the backoff of a key after a success."""
        self._failures.pop(key, None)

    async def get(self) -> str:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._queue.popleft()
        self._queued.discard(key)
        self._active.add(key)
        self.last_activity = time.monotonic()
        return key

    def done(self, key: str) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
