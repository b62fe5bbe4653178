"""Bounded request bodies (413, 408, 503 buffer_full) and per-route concurrency (429)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.errors import (
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyBudget:
    """The request-body bytes all requests hold at once, bounded (``listen.max_buffered_body``):
    unfinished uploads cannot add up to more memory than that, whatever their number."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Held:
    """One request's share of the :class:`BodyBudget`; ``release()`` gives it back."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def take(self, n: int) -> None:
        budget = self.budget
        if budget.used + n > budget.limit:
            raise ServiceUnavailable(
                "the gateway holds too many request bodies at once; retry later",
                code="buffer_full",
            )
        budget.used += n
        self.size += n

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0


def wants_continue(request: web.Request) -> bool:
    """The client waits for ``100 Continue`` before it sends the body."""
    return (
        request.version >= (1, 1)
        and request.headers.get("Expect", "").strip().lower() == "100-continue"
    )


async def read_body(
    request: web.Request, max_body: int, within: float = 0.0, held: Held | None = None
) -> bytes:
    """The whole request body, refusing more than ``max_body`` bytes.

    Decided from Content-Length before reading when there is one; counted while reading a
    chunked body (aiohttp's ``client_max_size`` guards only ``request.read()``). A client that
    waits for ``100 Continue`` gets it only here, once every answer the headers decide (401,
    403, 404, 405, 413, 429) has been ruled out. The body must arrive ``within`` seconds
    (408), and its bytes count against ``held``'s budget (503) while the request lasts.
    """
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(length, max_body)
    if not request.body_exists:
        return b""
    if held is not None and length is not None:
        held.take(length)
    if wants_continue(request):
        await request.writer.write(CONTINUE)
    content = request.content
    if content.is_eof():
        # the whole body came with the headers (most JSON calls): take it, no timer to set
        body = content.read_nowait()
        if length is None:
            if held is not None:
                held.take(len(body))
            if len(body) > max_body:
                raise too_large(None, max_body)
        return body
    try:
        async with asyncio.timeout(within or None):
            return await _read(request, max_body, held if length is None else None)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {within:g} s", code="request_timeout"
        ) from None


async def _read(request: web.Request, max_body: int, held: Held | None) -> bytes:
    body = bytearray()
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return bytes(body)
        if held is not None:
            held.take(len(chunk))
        body += chunk
        if len(body) > max_body:
            raise too_large(None, max_body)


def too_large(size: int | None, max_body: int) -> PayloadTooLarge:
    what = f"of {size} bytes " if size is not None else ""
    return PayloadTooLarge(f"request body {what}is over this route's limit of {max_body} bytes")


class ConcurrencyLimit:
    """Counts requests in flight; refuses at once beyond the limit rather than queueing."""

    __slots__ = ("active", "limit", "what")

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.active = 0
        self.what = what

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise TooManyRequests(
                f"too many concurrent requests for {self.what} (limit {self.limit}); retry later"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1
