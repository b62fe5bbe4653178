"""Build the aiohttp application from settings, and run it until a signal says stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.credentials import Credential, build_credentials
from gateway.endpoints import healthz, models_handler
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routing import Router

log = logging.getLogger("gateway")


@dataclass
class Gateway:
    """Everything one running app owns; no module-level state, so apps never interfere."""

    settings: Settings
    metrics: Metrics
    session: aiohttp.ClientSession
    credentials: dict[str, Credential]
    proxy: Proxy


GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)


def _connector(settings: Settings) -> aiohttp.TCPConnector:
    """A pool sized from the routes, so concurrency limits, not the pool, decide (default 100)."""
    limit = sum(r.max_concurrency for r in settings.routes) + 16
    return aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    session = aiohttp.ClientSession(
        connector=_connector(settings),
        auto_decompress=False,  # bytes pass through as the upstream sent them
        timeout=aiohttp.ClientTimeout(total=None),  # per-phase timeouts are enforced per request
        cookie_jar=aiohttp.DummyCookieJar(),  # a shared gateway must not mix clients' cookies
    )
    credentials = build_credentials(settings.credentials, session, metrics.token_refreshed)
    proxy = Proxy(settings, session, credentials, metrics)
    app[GATEWAY] = Gateway(settings, metrics, session, credentials, proxy)
    for credential in credentials.values():
        await credential.start()
    try:
        yield
    finally:
        for credential in credentials.values():
            await credential.close()
        await session.close()


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy.handle(request)


def build_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The gateway as an aiohttp application (its client session lives in ``cleanup_ctx``)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app.cleanup_ctx.append(_lifecycle)
    router = Router(settings.routes)
    app.router.add_get("/healthz", healthz)
    if router.models():
        app.router.add_get("/v1/models", models_handler(router))
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


def make_runner(app: web.Application, shutdown_timeout: float = 60.0) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its handler, which closes the
    # upstream request at once (GPU time costs money). Our own access log replaces aiohttp's.
    return web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )


async def serve(
    settings: Settings,
    *,
    started: Callable[[list[str]], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then clean up and return (the CLI exits 0)."""
    app = build_app(settings)
    runner = make_runner(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.listen.host, settings.listen.port)
        await site.start()
        addresses = [_address(s) for s in runner.addresses]
        log.info("serving on %s", ", ".join(addresses))
        if started is not None:
            result = started(addresses)
            if result is not None:
                await result
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    return str(sockname)
