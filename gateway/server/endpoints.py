"""The gateway's own endpoints: liveness, readiness, metrics and the configured model list."""

from __future__ import annotations

import os
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config.model import ApiKey
from gateway.errors import NotFound
from gateway.proxy.exchange import Exchange
from gateway.proxy.guard import add_cors
from gateway.proxy.runtime import Runtime
from gateway.server.state import GATEWAY, METRICS

_CREATED = int(time.time())


def _tagged(request: web.Request, response: web.Response) -> web.Response:
    """Every response carries X-Request-Id, the probes' and the scraper's too."""
    response.headers["X-Request-Id"] = request.app[GATEWAY].proxy.request_id(request)
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 for as long as the process serves requests; ``pid`` tells which process
    answered when several share the port (``listen.reuse_port``)."""
    return _tagged(request, web.json_response({"status": "ok", "pid": os.getpid()}))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when every credential can authenticate a request now; 503 otherwise."""
    gw = request.app[GATEWAY]
    if gw.proxy.draining:
        return _tagged(request, web.json_response({"status": "draining"}, status=503))
    credentials = gw.proxy.runtime.credentials.values()
    problems = [p for c in credentials if (p := c.ready()) is not None]
    if problems:
        body = {"status": "not ready", "problems": problems}
        return _tagged(request, web.json_response(body, status=503))
    return _tagged(request, web.json_response({"status": "ready"}))


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text from the app's own registry."""
    response = web.Response(body=generate_latest(request.app[METRICS].registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return _tagged(request, response)


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models`` in the OpenAI list format, from the routes' ``models``.

    A client call like any other, through the proxy's guard, access log and metrics (route ``-``).
    When the config lists no models it is proxied like any other path (a reload may add some).
    """
    return await request.app[GATEWAY].proxy.serve(request, _model_list)


async def model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{id}`` (openai's ``models.retrieve``): a configured model, else 404."""
    return await request.app[GATEWAY].proxy.serve(request, _model_object)


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "modelarts"}


async def _model_object(
    request: web.Request, ex: Exchange, key: ApiKey | None, rt: Runtime
) -> web.StreamResponse:
    name = request.match_info["id"]
    if not rt.router.models():
        return await request.app[GATEWAY].proxy.proxy(request, ex, key, rt)
    allowed = key is None or key.models is None or name in key.models
    if not allowed or not rt.router.serves(name):
        # the name is the client's own input: echoed only in a bounded form
        raise NotFound(f"the model '{name[:100]}' is not served here", code="model_not_found")
    return _answer(_model(name), ex)


async def _model_list(
    request: web.Request, ex: Exchange, key: ApiKey | None, rt: Runtime
) -> web.StreamResponse:
    names = rt.router.models()
    if not names:
        return await request.app[GATEWAY].proxy.proxy(request, ex, key, rt)
    if key is not None and key.models is not None:
        names = [m for m in names if m in key.models]
    return _answer({"object": "list", "data": [_model(m) for m in names]}, ex)


def _answer(body: dict[str, object], ex: Exchange) -> web.Response:
    response = web.json_response(body, headers={"X-Request-Id": ex.rid})
    if ex.cors_origin is not None:
        add_cors(response, ex.cors_origin)
    ex.status = response.status
    ex.bytes = response.content_length or 0
    return response
