"""The process's metrics and its /healthz and /metrics endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

RECONCILES = Counter("nubes_reconcile_total", "Converge passes", ["process", "kind", "result"])
RECONCILE_SECONDS = Histogram(
    "nubes_reconcile_duration_seconds", "Converge pass duration", ["process", "kind"]
)
STATUS_WRITES = Counter("nubes_status_writes_total", "Status applies", ["process", "kind"])
STATUS_CONFLICTS = Counter(
    "nubes_status_conflicts_total",
    "Status writes refused: a field belongs to another writer",
    ["process", "kind"],
)
QUEUE_DEPTH = Gauge("nubes_queue_depth", "Keys waiting", ["process", "kind"])
OBJECTS = Gauge("nubes_cached_objects", "Objects in the watch caches", ["process", "kind"])


async def serve(
    host: str,
    port: int,
    problems: Callable[[], dict[str, Any]],
    before_scrape: Callable[[], None],
) -> web.AppRunner:
    """Serve /healthz (503 with the `problems` while there are any) and
    /metrics (after `before_scrape` refreshed the gauges)."""

    async def healthz(_: web.Request) -> web.Response:
        found = problems()
        if found:
            return web.json_response({"ok": False, **found}, status=503)
        return web.json_response({"ok": True})

    async def metrics(_: web.Request) -> web.Response:
        before_scrape()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
