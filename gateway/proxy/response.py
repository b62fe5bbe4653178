"""The answer to the client: a small one read whole and sent in one write, or a relayed body."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable
from time import monotonic

import aiohttp
from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD

from gateway._aiohttp import ClientSink, ReaderSource, WholeResponse
from gateway.config.model import Route
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.http1 import UpstreamResponse
from gateway.metrics import Metrics
from gateway.proxy.exchange import CLIENT_GONE, Exchange
from gateway.proxy.guard import add_cors
from gateway.proxy.headers import client_response_headers
from gateway.proxy.redact import redact
from gateway.proxy.sse import Relay
from gateway.proxy.usage import UsageTap, from_json, from_tail

log = logging.getLogger("gateway.upstream")

# A non-streaming answer up to this size is read whole and sent in one write (an APIG-shaped
# error among them is re-shaped); larger ones and every stream are relayed chunk by chunk.
MAX_SMALL_BODY = 64 * 1024


async def read_small_body(response: UpstreamResponse, route: Route, deadline: float) -> bytes:
    """The whole body of a small non-streaming answer, read before any header goes out.

    Bounded by the route's ``idle`` and the ``total`` deadline like the relay, and translated
    here, so an upstream that stalls or drops the connection mid-body becomes a 504 or 502 for
    the client instead of a request that hangs for ever or an unhandled exception (aiohttp's
    bare text/plain 500, without X-Request-Id).
    """
    content = response.content
    if content.is_eof():  # already here whole, as small answers usually are
        try:
            return content.read_nowait(-1)
        except (aiohttp.ClientError, OSError):
            raise UpstreamError("the upstream connection failed") from None
    idle = route.timeouts.idle
    until_deadline = deadline - monotonic()
    wait = min(idle, until_deadline) if idle else until_deadline
    try:
        async with asyncio.timeout(wait):
            return await response.content.read()
    except TimeoutError:
        if monotonic() >= deadline:
            raise UpstreamTimeout(
                "the request used up its total time", code="upstream_total_timeout"
            ) from None
        raise UpstreamTimeout(
            "the upstream sent nothing for too long", code="upstream_idle_timeout"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("route %r: upstream error body cut short: %s", route.name, type(exc).__name__)
        raise UpstreamError("the upstream connection failed") from None


# APIG's request ids are 32 hex digits; anything token-like and bounded is kept, nothing else
_UPSTREAM_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ApigError(GatewayError):
    """An APIG error re-shaped, with the request id Huawei support asks for (None if absent)."""

    type = "upstream_error"

    def __init__(self, status: int, message: str, code: str, request_id: str | None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.request_id = request_id


def apig_error(
    status: int, body: bytes, secrets: Iterable[str] = (), header_id: str | None = None
) -> ApigError | None:
    """An APIG-shaped error (``{"error_code", "error_msg"}``) as an OpenAI-shaped one, else None.

    ModelArts' API gateway answers its own failures (throttling, size limit, ...) in its own
    shape; OpenAI clients show only ``error.message``, so its text is carried over, without
    any of ``secrets`` (an error that quotes the request's token must not hand it out). APIG's
    ``request_id`` (the body's, else ``header_id``: its X-Request-Id header) is kept in the
    message, for quoting to support.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or "error_code" not in data or "error" in data:
        return None
    message = redact(str(data.get("error_msg", "upstream error")), secrets)[:500]
    request_id = None
    for candidate in (data.get("request_id"), header_id):
        if isinstance(candidate, str) and _UPSTREAM_ID.fullmatch(candidate):
            request_id = redact(candidate, secrets)
            break
    if request_id is not None:
        message += f" (upstream request id {request_id})"
    code = redact(str(data["error_code"]), secrets)[:64]
    return ApigError(status, message, code, request_id)


async def whole(
    upstream: UpstreamResponse,
    route: Route,
    ex: Exchange,
    deadline: float,
    metrics: Metrics,
    secrets: Iterable[str] = (),
) -> web.Response:
    """A small, non-streaming answer, read whole and sent with its headers in one write.

    A JSON completion is usable only once complete, so nothing is held back from the client;
    an error in APIG's shape is re-shaped for OpenAI clients on the way.
    """
    body = await read_small_body(upstream, route, deadline)
    if _readable(upstream):
        from_json(body, ex.usage)
    series = metrics.route(route.name)
    series.chunks.bytes += len(body)
    ex.bytes = len(body)
    ex.end = "done"
    series.done.inc()
    headers = client_response_headers(upstream.headers)
    headers["X-Request-Id"] = ex.rid
    err = None
    if upstream.status >= 400:
        err = apig_error(upstream.status, body, secrets, upstream.headers.get("X-Request-Id"))
    if err is not None:
        headers["Content-Type"] = "application/json"
        body = err.body()
        if err.request_id is not None:
            headers["X-Upstream-Request-Id"] = ex.upstream_request_id = err.request_id
    response = WholeResponse(
        status=upstream.status, reason=upstream.reason, body=body, headers=headers
    )
    if ex.cors_origin:
        add_cors(response, ex.cors_origin)
    return response


async def relay_body(
    request: web.Request,
    route: Route,
    upstream: UpstreamResponse,
    ex: Exchange,
    deadline: float | None,
    metrics: Metrics,
    relays: set[Relay],
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=client_response_headers(upstream.headers),
    )
    response.headers["X-Request-Id"] = ex.rid
    if ex.cors_origin:
        add_cors(response, ex.cors_origin)
    sse = upstream.content_type == "text/event-stream"
    if sse:
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
    elif upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
        response.content_length = upstream.content_length
    await response.prepare(request)

    relay = Relay(
        ReaderSource(upstream.content),
        ClientSink(request, response),
        sse=sse,
        stats=metrics.chunk_stats(route.name),
        idle=route.timeouts.idle,
        deadline=deadline,
        heartbeat=route.heartbeat,
        on_heartbeat=metrics.child(metrics.heartbeats, route.name).inc,
        tap=UsageTap(ex.usage) if sse and _readable(upstream) else None,
    )
    active = metrics.child(metrics.active_streams, route.name)
    active.inc()
    relays.add(relay)
    try:
        ex.end = "client_gone"
        ex.end = await relay.run()
    finally:
        relays.discard(relay)
        active.dec()
        ex.bytes = relay.bytes
        metrics.child(metrics.stream_end, route.name, ex.end).inc()
        if not sse and _readable(upstream) and upstream.content_type == "application/json":
            from_tail(relay.last_bytes, ex.usage)
    if ex.end == "client_gone":
        ex.status = CLIENT_GONE
    elif ex.end != "done":
        log.warning("stream ended early: %s", ex.end)
    return response


def _readable(upstream: UpstreamResponse) -> bool:
    """True unless the body is compressed (passed on as is: its usage cannot be read)."""
    encoding = upstream.headers.get("Content-Encoding")
    return encoding is None or encoding.lower() == "identity"


def is_small(upstream: UpstreamResponse) -> bool:
    """A non-streaming answer of known, small size (a completion, an error)."""
    if upstream.content is EMPTY_PAYLOAD:  # no body at all (204, 304, HEAD)
        return True
    length = upstream.content_length
    return (
        length is not None
        and length <= MAX_SMALL_BODY
        and upstream.content_type != "text/event-stream"
        and "Transfer-Encoding" not in upstream.headers
    )
