"""The gateway's own endpoints: liveness and the configured model list."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.routing import Router


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 for as long as the process serves requests."""
    return web.json_response({"status": "ok"})


def models_handler(router: Router) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /v1/models`` in the OpenAI list format, from the routes' ``models``."""
    created = int(time.time())
    body = {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "modelarts"}
            for m in router.models()
        ],
    }

    async def models(request: web.Request) -> web.Response:
        return web.json_response(body)

    return models
