"""Bounded request bodies (413) and per-route concurrency (429)."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import PayloadTooLarge, TooManyRequests


async def read_body(request: web.Request, max_body: int) -> bytes:
    """The whole request body, refusing more than ``max_body`` bytes.

    Decided from Content-Length before reading when there is one; counted while reading a
    chunked body (aiohttp's ``client_max_size`` guards only ``request.read()``).
    """
    length = request.content_length
    if length is not None and length > max_body:
        raise too_large(length, max_body)
    if not request.body_exists:
        return b""
    body = bytearray()
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return bytes(body)
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
