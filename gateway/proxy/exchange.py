"""One client call as the gateway records it: request id, error answer, access-log line, metrics.

Shared by proxied calls and the gateway's own ``/v1/models``, so both log and count alike.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway import log as gwlog
from gateway._aiohttp import WholeResponse
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    RateLimited,
)
from gateway.metrics import Metrics
from gateway.proxy.usage import Usage

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

    def fresh(self) -> str:
        """A new id, for an answer to a request that could not be parsed."""
        return f"{self._prefix}{self._next():016x}"

    def __call__(self, request: web.Request) -> str:
        """The client's X-Request-Id when it is a sane token, else a fresh one."""
        given = request.headers.get("X-Request-Id")
        if given is not None and _REQUEST_ID.match(given):
            return given
        return f"{self._prefix}{self._next():016x}"


def error_response(err: GatewayError, rid: str) -> web.Response:
    """The JSON answer for ``err``, with its request id and, where it has one, when to retry
    (Retry-After) or what is allowed (Allow)."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["X-Request-Id"] = rid
    if isinstance(err, RateLimited):  # a key over its limit: when it admits again
        headers["Retry-After"] = str(err.retry_after)
    elif err.status in (429, 503):  # over a limit, draining, buffers full: soon, maybe elsewhere
        headers["Retry-After"] = "1"
    elif isinstance(err, MethodNotAllowed):
        headers["Allow"] = err.allow
    return WholeResponse(
        status=err.status, body=err.body(), content_type="application/json", headers=headers
    )


@dataclass(slots=True)
class Exchange:
    """What one request did, for the access log and metrics.

    ``usage`` is filled by the response stage as the answer passes (whole JSON body, or the SSE
    event carrying it) and is final when :func:`record` runs at the request's end: that is the
    one place to count a request's tokens.
    """

    rid: str
    start: float
    route: str = "-"
    key: str = "-"
    model: str = "-"  # the configured (public) model name the request selected
    usage: Usage = field(default_factory=Usage)
    status: int = 0
    ttfb: float | None = None
    bytes: int = 0
    end: str = "-"
    cors_origin: str | None = None
    close: bool = False  # close the connection after this answer
    upstream_request_id: str | None = None  # APIG's, from a re-shaped error

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens of the answer (0 when unknown): what a key's
        token limits count when the request ends."""
        return self.usage.total


def record(metrics: Metrics, request: web.Request, ex: Exchange, now: float) -> None:
    """Metrics and the access-log line for one finished request."""
    duration = now - ex.start
    m = metrics
    if ex.route != "-":
        series = m.route(ex.route)
        series.requests(ex.status).inc()
        series.duration.observe(duration)
    else:
        m.child(m.requests, "-", str(ex.status)).inc()
    if ex.key != "-":
        m.child(m.key_requests, ex.key, str(ex.status)).inc()
    usage = ex.usage
    if ex.route != "-" and usage.known:
        if usage.prompt:
            m.child(m.tokens, ex.route, ex.key, ex.model, "prompt").inc(usage.prompt)
        if usage.completion:
            m.child(m.tokens, ex.route, ex.key, ex.model, "completion").inc(usage.completion)
    values = (  # gwlog.STANDARD_FIELDS, in their order
        ex.rid,
        ex.key,
        request.method,
        # raw (still percent-encoded): a decoded %0A must not start a fake log line
        request.raw_path.split("?", 1)[0][:200],
        ex.route,
        ex.status,
        _ms(duration),
        _ms(ex.ttfb) if ex.ttfb is not None else "-",
        ex.bytes,
        ex.end,
        "-" if usage.prompt is None else usage.prompt,
        "-" if usage.completion is None else usage.completion,
    )
    if ex.upstream_request_id:
        fields: dict[str, Any] = dict(zip(gwlog.STANDARD_FIELDS, values, strict=True))
        fields["upstream_request_id"] = ex.upstream_request_id
        gwlog.access_fields(fields)
    else:
        gwlog.access_standard(values)


def _ms(seconds: float) -> float:
    """``seconds`` in milliseconds to 0.1 ms: ``round(seconds * 1000, 1)`` without its
    decimal conversion (a float ``round`` to digits converts to text and back: ~2.8k
    instructions); the two can differ only where ``seconds * 10_000`` is a tie, by 0.1 ms."""
    return round(seconds * 10_000) / 10
