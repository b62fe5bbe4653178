"""The proxy handler: the only module that knows the order of the stages.

guard (Host/Origin 403, API key 401) → draining 503 → path check 400 → route 404
→ body ≤ max_body 413 → model 400/403/404 → concurrency (route, key) 429
→ credential 502 → upstream (connect, first_byte 504, 401 replay once) 502/504
→ small answer whole, or headers then relay chunk by chunk → metrics and access log
finally: release the concurrency slots, release the upstream response
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from time import monotonic
from urllib.parse import unquote

from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD

from gateway import log as gwlog
from gateway.auth import Guard
from gateway.config import ApiKey, Route, Settings
from gateway.credentials import Credential, Outgoing
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    ServiceUnavailable,
    TooManyRequests,
)
from gateway.headers import client_response_headers, upstream_request_headers
from gateway.limits import ConcurrencyLimit, read_body, too_large
from gateway.metrics import Metrics
from gateway.relay import ClientSink, Relay
from gateway.routing import PathGroup, Router
from gateway.upstream import MAX_SMALL_BODY, apig_error, read_small_body, send, upstream_url
from gateway.upstream_client import UpstreamClient, UpstreamResponse

log = logging.getLogger("gateway.proxy")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CLIENT_GONE = 499  # nginx's convention, for logs and metrics only


class RequestIds:
    """Fresh request ids: a random per-process prefix and a counter.

    Unique and cheap (a uuid4 costs a getrandom() call per request); they need not be secret.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count(1).__next__

    def __call__(self, request: web.Request) -> str:
        """The client's X-Request-Id when it is a sane token, else a fresh one."""
        given = request.headers.get("X-Request-Id")
        if given is not None and _REQUEST_ID.match(given):
            return given
        return f"{self._prefix}{self._next():016x}"


def error_response(err: GatewayError, rid: str) -> web.Response:
    headers = {"X-Request-Id": rid}
    if err.status == 429:
        headers["Retry-After"] = "1"
    return web.Response(
        status=err.status, body=err.body(), content_type="application/json", headers=headers
    )


CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project"
)


def add_cors(response: web.StreamResponse, origin: str) -> None:
    """CORS headers for an allowed origin (``listen.allowed_origins``)."""
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
    response.headers.add("Vary", "Origin")


def preflight(origin: str, request: web.Request) -> web.Response:
    """The answer to a CORS preflight from an allowed origin."""
    response = web.Response(status=204)
    add_cors(response, origin)
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", CORS_ALLOW_HEADERS
    )
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def check_path(raw_path: str) -> None:
    """Refuse dot-segments: joined to the upstream URL they could climb out of the service."""
    path = raw_path.split("?", 1)[0]
    for segment in path.split("/"):
        if segment in (".", "..") or unquote(segment) in (".", ".."):
            raise BadRequest("the path must not contain '.' or '..' segments", code="invalid_path")


def model_of(body: bytes) -> str | None:
    """The body's ``model`` field; None when there is no body or no such field."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    model = data.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise BadRequest('"model" must be a string', code="invalid_model")
    return model


@dataclass
class Exchange:
    """What one request did, for the access log and metrics."""

    rid: str
    start: float
    route: str = "-"
    key: str = "-"
    status: int = 0
    ttfb: float | None = None
    bytes: int = 0
    end: str = "-"
    cors_origin: str | None = None


class Proxy:
    def __init__(
        self,
        settings: Settings,
        client: UpstreamClient,
        credentials: Mapping[str, Credential],
        metrics: Metrics,
    ) -> None:
        self.router = Router(settings.routes)
        self.guard = Guard(settings.listen)
        self.client = client
        self.credentials = credentials
        self.metrics = metrics
        self.route_limits = {
            r.name: ConcurrencyLimit(r.max_concurrency, f"route {r.name!r}")
            for r in settings.routes
        }
        self.key_limits = {
            k.name: ConcurrencyLimit(k.max_concurrency, f"API key {k.name!r}")
            for k in settings.listen.api_keys
            if k.max_concurrency
        }
        self.request_id = RequestIds()
        self.relays: set[Relay] = set()
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ex = Exchange(rid=self.request_id(request), start=monotonic())
        gwlog.request_id.set(ex.rid)
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                response = await self._handle(request, ex)
            except GatewayError as err:
                ex.status = err.status
                if ex.ttfb is None:  # refused by the gateway, not answered by the upstream
                    self.metrics.rejected.labels(ex.route, err.code).inc()
                if err.status >= 500:
                    log.warning("%s: %s", err.code, err.message)
                response = error_response(err, ex.rid)
                if ex.cors_origin:
                    add_cors(response, ex.cors_origin)
                if self.draining:
                    response.force_close()
            except asyncio.CancelledError:
                ex.status = CLIENT_GONE
                if ex.end == "-":
                    ex.end = "client_gone"
                self.record(request, ex, monotonic())
                raise
            self.record(request, ex, monotonic())
            return response
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    def record(self, request: web.Request, ex: Exchange, now: float) -> None:
        """Metrics and the access-log line for one finished request."""
        duration = now - ex.start
        m = self.metrics
        status = str(ex.status)
        m.child(m.requests, ex.route, status).inc()
        if ex.route != "-":
            m.child(m.duration, ex.route).observe(duration)
        if ex.key != "-":
            m.child(m.key_requests, ex.key, status).inc()
        gwlog.access(
            request_id=ex.rid,
            key=ex.key,
            method=request.method,
            # raw (still percent-encoded): a decoded %0A must not start a fake log line
            path=request.raw_path.split("?", 1)[0][:200],
            route=ex.route,
            status=ex.status,
            duration_ms=round(duration * 1000, 1),
            ttfb_ms=round(ex.ttfb * 1000, 1) if ex.ttfb is not None else "-",
            bytes=ex.bytes,
            end=ex.end,
        )

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        # before check(): its 401/403 must be readable by an allowed origin's page too
        ex.cors_origin = self.guard.allowed_origin(request)
        key = self.guard.check(request)
        if ex.cors_origin and request.method == "OPTIONS":
            ex.status = 204
            return preflight(ex.cors_origin, request)
        if key is not None:
            ex.key = key.name
        if self.draining:
            raise ServiceUnavailable("the gateway is shutting down; retry on another instance")
        check_path(request.raw_path)
        group = self.router.match(request.path)
        route, body = await self._select(request, group, key, ex)
        limits = [self.route_limits[route.name]]
        if key is not None and key.name in self.key_limits:
            limits.append(self.key_limits[key.name])
        for i, limit in enumerate(limits):
            try:
                limit.acquire()
            except TooManyRequests:
                for taken in limits[:i]:
                    taken.release()
                raise
        try:
            return await self._forward(request, route, body, ex)
        finally:
            for limit in limits:
                limit.release()

    async def _select(
        self, request: web.Request, group: PathGroup, key: ApiKey | None, ex: Exchange
    ) -> tuple[Route, bytes]:
        """The route for this request and its body (read within the route's max_body)."""
        restricted = key is not None and key.models is not None
        if not group.needs_model and not restricted:
            route = group.routes[0]
            ex.route = route.name
            return route, await read_body(request, route.max_body)
        if len(group.routes) == 1:
            ex.route = group.routes[0].name
        body = await read_body(request, max(r.max_body for r in group.routes))
        model = model_of(body)
        if key is not None and key.models is not None and model not in key.models:
            raise Forbidden(
                f"API key {key.name!r} may not use this model", code="model_not_allowed"
            )
        route = group.select(model)
        ex.route = route.name
        if len(body) > route.max_body:
            raise too_large(len(body), route.max_body)
        return route, body

    async def _forward(
        self, request: web.Request, route: Route, body: bytes, ex: Exchange
    ) -> web.StreamResponse:
        total = route.timeouts.total
        deadline = ex.start + total if total else monotonic() + 10 * 365 * 86400.0
        outgoing = Outgoing(
            method=request.method,
            url=upstream_url(route, request.raw_path),
            headers=upstream_request_headers(request.headers),
            body=body,
        )
        outgoing.headers["X-Request-Id"] = ex.rid
        upstream = await send(
            self.client, route, self.credentials[route.credential], outgoing, deadline
        )
        try:
            ex.ttfb = monotonic() - ex.start
            self.metrics.child(self.metrics.ttfb, route.name).observe(ex.ttfb)
            ex.status = upstream.status
            response: web.StreamResponse
            if is_small(upstream):
                response = await self._whole(upstream, route, ex, deadline)
            else:
                response = await self._relay(
                    request, route, upstream, ex, deadline if total else None
                )
        finally:
            # back to the pool when the body was read to its end; aiohttp closes it otherwise
            upstream.release()
        return response

    async def _whole(
        self, upstream: UpstreamResponse, route: Route, ex: Exchange, deadline: float
    ) -> web.Response:
        """A small, non-streaming answer, read whole and sent with its headers in one write.

        A JSON completion is usable only once complete, so nothing is held back from the client;
        an error in APIG's shape is re-shaped for OpenAI clients on the way.
        """
        body = await read_small_body(upstream, route, deadline)
        self.metrics.chunk_stats(route.name).bytes += len(body)
        ex.bytes = len(body)
        ex.end = "done"
        self.metrics.child(self.metrics.stream_end, route.name, "done").inc()
        headers = client_response_headers(upstream.headers)
        headers["X-Request-Id"] = ex.rid
        err = apig_error(upstream.status, body) if upstream.status >= 400 else None
        if err is not None:
            headers["Content-Type"] = "application/json"
            body = err.body()
        response = web.Response(
            status=upstream.status, reason=upstream.reason, body=body, headers=headers
        )
        if ex.cors_origin:
            add_cors(response, ex.cors_origin)
        return response

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        upstream: UpstreamResponse,
        ex: Exchange,
        deadline: float | None,
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

        metrics = self.metrics
        relay = Relay(
            upstream.content,
            ClientSink(request, response),
            sse=sse,
            stats=metrics.chunk_stats(route.name),
            idle=route.timeouts.idle,
            deadline=deadline,
            heartbeat=route.heartbeat,
            on_heartbeat=metrics.child(metrics.heartbeats, route.name).inc,
        )
        active = metrics.child(metrics.active_streams, route.name)
        active.inc()
        self.relays.add(relay)
        try:
            ex.end = "client_gone"
            ex.end = await relay.run()
        finally:
            self.relays.discard(relay)
            active.dec()
            ex.bytes = relay.bytes
            metrics.child(metrics.stream_end, route.name, ex.end).inc()
        if ex.end == "client_gone":
            ex.status = CLIENT_GONE
        elif ex.end != "done":
            log.warning("stream ended early: %s", ex.end)
        return response


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
