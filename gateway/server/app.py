"""The gateway as an aiohttp application: what serves each path, and what it owns."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway._aiohttp import GatewayRunner
from gateway.config.model import LimitsStore, Settings
from gateway.errors import error_body
from gateway.http1 import UpstreamClient
from gateway.limits import Store
from gateway.limits.memory import MemoryStore
from gateway.metrics import Metrics
from gateway.proxy import body
from gateway.proxy.exchange import RequestIds
from gateway.proxy.handler import Proxy
from gateway.proxy.runtime import Runtime
from gateway.server import endpoints
from gateway.server.reload import ConfigSource, Reloader
from gateway.server.runtimes import Runtimes
from gateway.server.state import GATEWAY, METRICS, SETTINGS, Gateway

__all__ = ["GATEWAY", "METRICS", "build_app", "make_runner"]

# After shutdown_grace, streams get their `event: error` (code "shutdown"); this long is left
# for those last writes before connections are closed.
FINAL_WRITE_GRACE = 2.0


def build_app(
    settings: Settings, metrics: Metrics | None = None, source: ConfigSource | None = None
) -> web.Application:
    """The gateway's routes, its proxy, and the lifetime of what needs the event loop.

    With ``source`` (the file ``settings`` came from) the config can be reloaded while serving.
    """
    metrics = metrics if metrics is not None else Metrics()
    client = UpstreamClient()  # proxied requests go through the lean HTTP/1.1 client
    limits_store = open_limits_store(settings.limits_store)
    # the credentials are built at start-up (they need the loop's session): until then, none
    proxy = Proxy(Runtime(settings, {}), client, metrics, limits_store)
    metrics.watch_pool(lambda: [r.name for r in proxy.runtime.settings.routes], client.sizes)
    runtimes = Runtimes(proxy, metrics)
    reloader = Reloader(source, runtimes, metrics) if source is not None else None

    app = web.Application(middlewares=[_not_origin_form(proxy.handle)])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[GATEWAY] = Gateway(metrics, proxy, runtimes, reloader)
    app.cleanup_ctx.append(_lifetime(settings, runtimes, reloader, client, limits_store))
    app.router.add_get("/healthz", endpoints.healthz)
    app.router.add_get("/readyz", endpoints.readyz)
    app.router.add_get("/metrics", endpoints.metrics)
    # proxied instead while the config lists no models (a reload may add or remove them)
    app.router.add_get("/v1/models", endpoints.models)
    app.router.add_get("/v1/models/{id:.+}", endpoints.model)
    # "100 Continue" is the proxy's to send, once the headers cannot get the request refused
    app.router.add_route(
        "*", "/{tail:.*}", proxy.handle, expect_handler=_expect_later(proxy.request_id)
    )
    return app


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _not_origin_form(handle: _Handler) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Targets that are not origin-form go to the proxy, which refuses them in its own shape
    (400 invalid_path): some aiohttp releases (3.13) match ``*`` against no route at all. So
    does a path no route matched (the catch-all's ``.*`` stops at a decoded ``%0A``): aiohttp's
    own 404 would be text/plain, without X-Request-Id."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.raw_path[:1] != "/" or request.match_info.http_exception is not None:
            return await handle(request)
        return await handler(request)

    return middleware


class _ProxyOnly:
    """Requests that no route but the proxy's catch-all can take, for the proxy at once.

    The gateway's own endpoints answer GET (and HEAD) only, and a request with an ``Expect``
    header goes through the catch-all's expect handler: any other request reaches
    ``proxy.handle`` whatever its path (the catch-all, or the middleware for a target that is
    not origin-form), so the router and the middleware chain are skipped for it.
    """

    def __init__(self, proxy: Proxy) -> None:
        # proxy.handle without its own coroutine layer (one less per request)
        self.handle = functools.partial(proxy.serve, answer=proxy.proxy)

    @staticmethod
    def wants(request: web.BaseRequest) -> bool:
        return request.method not in _OWN_METHODS and not request.headers.get("Expect")


_OWN_METHODS = frozenset(("GET", "HEAD"))


def open_limits_store(config: LimitsStore) -> Store:
    """The store ``limits_store`` names (Redis connects on first use, not here)."""
    if config.type == "redis":
        from gateway.limits.redis_store import RedisStore  # the optional extra `redis`

        return RedisStore(config)
    return MemoryStore()


def _lifetime(
    settings: Settings,
    runtimes: Runtimes,
    reloader: Reloader | None,
    client: UpstreamClient,
    limits_store: Store,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # IAM calls (rare) go through aiohttp's client session
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        await runtimes.start(session, settings)
        if reloader is not None:
            reloader.start()
        try:
            yield
        finally:
            if reloader is not None:
                await reloader.close()
            await runtimes.close()
            await client.close()
            await session.close()
            await limits_store.close()
            body.shutdown()

    return lifetime


def _expect_later(
    request_id: RequestIds,
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    async def expect(request: web.Request) -> web.StreamResponse | None:
        """Nothing yet for ``Expect: 100-continue`` (see ``limits.read_body``); 417 otherwise."""
        if request.headers.get("Expect", "").strip().lower() == "100-continue":
            return None
        response = web.Response(
            status=417,
            body=error_body(
                "only 'Expect: 100-continue' is supported", "invalid_request_error", "bad_expect"
            ),
            content_type="application/json",
            headers={"X-Request-Id": request_id(request)},
        )
        response.force_close()
        return response

    return expect


def _malformed(request_id: RequestIds) -> Callable[[int], web.Response]:
    def answer(status: int) -> web.Response:
        """The answer to a request aiohttp could not parse, in the gateway's error shape."""
        text = "malformed HTTP request" if status < 500 else "internal error"
        code = "bad_http_request" if status < 500 else "internal_error"
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return web.Response(
            status=status,
            body=error_body(text, type_, code),
            content_type="application/json",
            headers={"X-Request-Id": request_id.fresh()},
        )

    return answer


def make_runner(app: web.Application, shutdown_timeout: float = FINAL_WRITE_GRACE) -> web.AppRunner:
    # handler_cancellation: a client that goes away cancels its handler, which closes the
    # upstream request at once (GPU time costs money). Our own access log replaces aiohttp's.
    listen = app[SETTINGS].listen
    return GatewayRunner(
        app,
        header_timeout=listen.header_timeout,
        error_response=_malformed(app[GATEWAY].proxy.request_id),
        max_connections=listen.max_connections,
        on_refused=app[METRICS].connections_refused.inc,
        direct=_ProxyOnly(app[GATEWAY].proxy),
        keepalive_timeout=listen.keepalive_timeout,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
