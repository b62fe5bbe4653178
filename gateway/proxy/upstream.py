"""Sending one request upstream: credentials last, per-phase timeouts, one replay after a 401.

This is the one boundary where aiohttp and asyncio exceptions become GatewayErrors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from time import monotonic

import aiohttp

from gateway.config.model import Route
from gateway.credentials import Credential, Outgoing
from gateway.errors import (
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.http1 import (
    BadHeader,
    BadResponse,
    ConnectFailed,
    ConnectTimedOut,
    UpstreamClient,
    UpstreamResponse,
)
from gateway.proxy.response import MAX_SMALL_BODY

log = logging.getLogger("gateway.upstream")


async def send(
    client: UpstreamClient,
    route: Route,
    credential: Credential,
    outgoing: Outgoing,
    deadline: float,
) -> UpstreamResponse:
    """Response headers from the upstream, replaying once with a fresh credential after a 401.

    ``deadline`` is the loop time by which the whole exchange must be over (``total``).
    """
    await credential.apply(outgoing)
    response = await _attempt(client, route, outgoing, deadline)
    if response.status != 401:
        return response
    if credential.invalidate(outgoing):
        response.close()
        log.info(
            "upstream answered 401 for route %r; refreshing credential %r and replaying",
            route.name,
            credential.name,
        )
        await credential.apply(outgoing)
        response = await _attempt(client, route, outgoing, deadline)
        if response.status != 401:
            return response
    try:
        detail = await _refusal(response)
    finally:
        response.close()
    raise UpstreamAuthRejected(f"the upstream refused credential {credential.name!r} ({detail})")


_ERROR_CODE = re.compile(r"[A-Za-z0-9._-]{1,40}")


async def _refusal(response: UpstreamResponse) -> str:
    """What a 401 says that is safe to repeat: APIG's error code, and a hint for a stale clock.

    Never the message itself: APIG's "verify signature fail" text quotes the signed headers
    (a security token among them).
    """
    detail = "HTTP 401"
    length = response.content_length
    if length is None or length > MAX_SMALL_BODY:
        return detail
    try:
        async with asyncio.timeout(2):
            data = json.loads(await response.content.read())
        code, message = str(data["error_code"]), str(data.get("error_msg", ""))
    except (TimeoutError, ValueError, KeyError, TypeError, aiohttp.ClientError):
        return detail
    if _ERROR_CODE.fullmatch(code):
        detail += f", {code}"
    if "signature expired" in message.lower():
        detail += ": the signature expired; check this machine's clock"
    return detail


async def _attempt(
    client: UpstreamClient, route: Route, outgoing: Outgoing, deadline: float
) -> UpstreamResponse:
    t = route.timeouts
    remaining = deadline - monotonic() if t.total else t.first_byte
    wait = min(t.first_byte, remaining)
    if wait <= 0:
        raise UpstreamTimeout("the request used up its total time", code="upstream_total_timeout")
    try:
        return await client.request(
            outgoing.method,
            outgoing.url,
            outgoing.headers,
            outgoing.body,
            t.connect,
            pool=route.name,
            keepalive=t.pool_idle,
            first_byte=wait,
        )
    except ConnectTimedOut:
        raise UpstreamTimeout(
            f"could not connect to the upstream within {t.connect:g} s",
            code="upstream_connect_timeout",
        ) from None
    except TimeoutError:
        if wait < t.first_byte:
            raise UpstreamTimeout(
                "the request used up its total time before the upstream answered",
                code="upstream_total_timeout",
            ) from None
        raise UpstreamTimeout(
            f"the upstream sent no response headers within {t.first_byte:g} s"
        ) from None
    except ConnectFailed as exc:
        log.warning("route %r: cannot connect to upstream: %s", route.name, exc.strerror)
        raise UpstreamUnreachable("the upstream is unreachable") from None
    except BadResponse:
        log.warning("route %r: the upstream's answer is not HTTP/1.x", route.name)
        raise UpstreamError("the upstream's answer is not valid HTTP") from None
    except BadHeader as exc:
        log.warning("route %r: %s", route.name, exc)
        raise UpstreamUnreachable("a header could not be sent", code="invalid_header") from None
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("route %r: upstream request failed: %s", route.name, type(exc).__name__)
        raise UpstreamUnreachable("the upstream closed the connection without answering") from None
