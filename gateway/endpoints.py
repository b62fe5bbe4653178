"""The gateway's own endpoints: liveness, readiness, metrics and the configured model list."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import log as gwlog
from gateway.errors import GatewayError
from gateway.proxy import Exchange, add_cors, error_response
from gateway.state import GATEWAY, METRICS

_CREATED = int(time.time())


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 for as long as the process serves requests."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when every credential can authenticate a request now; 503 otherwise."""
    gw = request.app[GATEWAY]
    if gw.proxy.draining:
        return web.json_response({"status": "draining"}, status=503)
    problems = [p for c in gw.credentials.values() if (p := c.ready()) is not None]
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text from the app's own registry."""
    response = web.Response(body=generate_latest(request.app[METRICS].registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models`` in the OpenAI list format, from the routes' ``models``.

    A client call like any other: one access-log line and the request metrics (route ``-``).
    """
    proxy = request.app[GATEWAY].proxy
    ex = Exchange(rid=proxy.request_id(request), start=time.monotonic())
    gwlog.request_id.set(ex.rid)
    origin = proxy.guard.allowed_origin(request)
    try:
        key = proxy.guard.check(request)
    except GatewayError as err:
        proxy.metrics.rejected.labels(ex.route, err.code).inc()
        response = error_response(err, ex.rid)
    else:
        ex.key = key.name if key is not None else "-"
        names = proxy.router.models()
        if key is not None and key.models is not None:
            names = [m for m in names if m in key.models]
        body = {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": _CREATED, "owned_by": "modelarts"}
                for m in names
            ],
        }
        response = web.json_response(body, headers={"X-Request-Id": ex.rid})
        ex.bytes = response.content_length or 0
    if origin is not None:
        add_cors(response, origin)
    ex.status = response.status
    proxy.record(request, ex, time.monotonic())  # the same access line and metrics as proxied calls
    return response
