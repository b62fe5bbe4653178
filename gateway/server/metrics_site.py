"""A per-process side port for /metrics, /healthz and /readyz (``listen.metrics_port``).

With several processes on one port (``listen.reuse_port``) the kernel picks which process takes
each new connection, so a scrape of the shared port reads one random process's counters. Each
process therefore also listens on ``metrics_port + worker index``, its own port, where
Prometheus scrapes every process as a target of its own.
"""

from __future__ import annotations

from aiohttp import web

from gateway.server import endpoints
from gateway.server.state import GATEWAY, METRICS, SETTINGS


async def start_metrics_site(app: web.Application, worker: int) -> web.AppRunner | None:
    """Listen on this process's metrics port, if one is configured; the caller cleans it up."""
    listen = app[SETTINGS].listen
    if listen.metrics_port is None:
        return None
    side = web.Application()
    side[SETTINGS] = app[SETTINGS]
    side[METRICS] = app[METRICS]
    side[GATEWAY] = app[GATEWAY]
    side.router.add_get("/metrics", endpoints.metrics)
    side.router.add_get("/healthz", endpoints.healthz)
    side.router.add_get("/readyz", endpoints.readyz)
    runner = web.AppRunner(side, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.metrics_port + worker).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
