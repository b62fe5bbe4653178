"""What the fakes share: loopback serving, wire constants, stable ids and JSON digging."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from aiohttp import web

# ModelArts "Accessing a Real-Time Service Using Server-Sent Events": "In normal cases, the value
# of Content-Type in the response header is text/event-stream;charset=UTF-8" (no space).
SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"

# ModelArts real-time service constraints: "The size of a request body cannot exceed 12 MB";
# API Gateway answers APIG.0201 "Request entity too large." with 413 (APIG error code table).
MODELARTS_MAX_BODY = 12 * 1024 * 1024


Json = dict[str, Any]


async def serve_on_loopback(
    app: web.Application, port: int = 0, *, shutdown_timeout: float = 0.1
) -> tuple[web.AppRunner, str]:
    """Start ``app`` on 127.0.0.1 (port 0 lets the OS choose); return (runner, base URL).

    The caller owns the runner and must ``await runner.cleanup()``. ``handler_cancellation`` is on
    so a handler stalled mid-stream is cancelled when its client goes away, like a real server
    noticing a closed socket. aiohttp's shutdown waits ``shutdown_timeout`` twice for handlers
    still running (a stalled stream never finishes), so the default is short to keep teardown fast.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, f"http://127.0.0.1:{bound_port}"


def stable_id(kind: str, name: str) -> str:
    """A 32-hex id derived from a name: looks like a Huawei id and is stable across runs."""
    return hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()[:32]


def json_obj(parent: Any, key: str) -> Json | None:
    """``parent[key]`` if parent is a dict and that value is a dict, else None."""
    if isinstance(parent, dict):
        child = parent.get(key)
        if isinstance(child, dict):
            return child
    return None


def json_str(parent: Json | None, key: str) -> str | None:
    """``parent[key]`` if it is a non-empty string, else None."""
    if parent is None:
        return None
    value = parent.get(key)
    return value if isinstance(value, str) and value else None


def abort(request: web.Request) -> None:
    """Drop the TCP connection without a clean end, as a crashed upstream does."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def forever() -> None:
    """Wait for ever; only cancellation (client gone, server shutdown) ends it."""
    await asyncio.get_running_loop().create_future()
