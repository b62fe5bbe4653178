"""Build the aiohttp application from settings; serve it until a signal, then drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.config.model import Settings
from gateway.credentials import build_credentials
from gateway.errors import error_body
from gateway.http1 import UpstreamClient
from gateway.metrics import Metrics
from gateway.proxy.handler import Proxy
from gateway.proxy.routing import Router
from gateway.server import endpoints
from gateway.server.state import GATEWAY, METRICS, SETTINGS, Gateway
from gateway.server.systemd import notify

__all__ = ["GATEWAY", "METRICS", "build_app", "make_runner", "serve"]

log = logging.getLogger("gateway")

# After shutdown_grace, streams get their `event: error` (code "shutdown"); this long is left
# for those last writes before connections are closed.
FINAL_WRITE_GRACE = 2.0


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    # IAM calls (rare) go through aiohttp's client; proxied requests through the lean one.
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    credentials = build_credentials(settings.credentials, session, metrics.token_refreshed)
    client = UpstreamClient()
    proxy = Proxy(settings, client, credentials, metrics)
    app[GATEWAY] = Gateway(settings, metrics, session, credentials, proxy)
    for credential in credentials.values():
        await credential.start()
    try:
        yield
    finally:
        for credential in credentials.values():
            await credential.close()
        await client.close()
        await session.close()


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].proxy.handle(request)


def build_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The gateway as an aiohttp application (its client session lives in ``cleanup_ctx``)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/healthz", endpoints.healthz)
    app.router.add_get("/readyz", endpoints.readyz)
    app.router.add_get("/metrics", endpoints.metrics)
    if Router(settings.routes).models():
        app.router.add_get("/v1/models", endpoints.models)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's protocol handler with two changes.

    Unparsable requests are answered in our JSON error shape: aiohttp's own 400 is text/plain and
    quotes the offending bytes back, which may be a header line holding a credential.

    A connection whose first request's headers are not complete within ``header_timeout`` is
    closed (aiohttp has no such limit): a client trickling headers a byte at a time would
    otherwise hold its socket for ever, and enough of them would exhaust file descriptors.
    """

    header_timeout = 0.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.header_timeout:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._headers_too_slow
            )

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._request_count == 0 and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, None)  # logs (redacted) and may raise
        text = "malformed HTTP request" if status < 500 else "internal error"
        code = "bad_http_request" if status < 500 else "internal_error"
        type_ = "invalid_request_error" if status < 500 else "server_error"
        response = web.Response(
            status=status, body=error_body(text, type_, code), content_type="application/json"
        )
        response.force_close()
        return response


class _Server(Server):
    header_timeout = 0.0

    def __call__(self) -> RequestHandler:
        handler = _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        return handler


class _Runner(web.AppRunner):
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our protocol handler factory
        assert isinstance(server, _Server)
        server.header_timeout = self.app[SETTINGS].listen.header_timeout
        return server


def make_runner(app: web.Application, shutdown_timeout: float = FINAL_WRITE_GRACE) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its handler, which closes the
    # upstream request at once (GPU time costs money). Our own access log replaces aiohttp's.
    return _Runner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )


async def drain(runner: web.AppRunner, grace: float, hurry: asyncio.Event) -> None:
    """Stop like a good citizen: not ready, no new connections, let streams finish, then stop.

    Streams still open after ``grace`` (or at a second signal) end with an ``event: error``
    whose code is ``shutdown``, so a client can tell the cut from a clean end.
    """
    proxy = runner.app[GATEWAY].proxy
    proxy.draining = True
    for site in list(runner.sites):
        await site.stop()
    if proxy.in_flight:
        log.info("draining %d request(s), for up to %g s", proxy.in_flight, grace)
        waiters = [asyncio.ensure_future(proxy.idle.wait()), asyncio.ensure_future(hurry.wait())]
        await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    if proxy.relays:
        log.info("ending %d stream(s) still open", len(proxy.relays))
        for relay in list(proxy.relays):
            relay.stop("shutdown")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_WRITE_GRACE):
                await proxy.idle.wait()
    await runner.cleanup()


async def serve(
    settings: Settings,
    *,
    notify_socket: str | None = None,
    started: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, drain, and return (the CLI then exits 0)."""
    app = build_app(settings)
    runner = make_runner(app)
    await runner.setup()
    signals = 0
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        (stop if signals == 1 else hurry).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            site = web.TCPSite(runner, settings.listen.host, settings.listen.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        addresses = [_address(s) for s in runner.addresses]
        log.info("serving on %s", ", ".join(addresses))
        notify(notify_socket, "READY=1")
        if started is not None:
            started(addresses)
        await stop.wait()
        log.info("stopping")
        notify(notify_socket, "STOPPING=1")
        await drain(runner, settings.listen.shutdown_grace, hurry)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    return str(sockname)
