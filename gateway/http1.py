"""A lean HTTP/1.1 client for the upstream: keep-alive connections and aiohttp's parser.

aiohttp's ``ClientSession`` costs about 80 µs of CPU per request on top of the socket work
(request and response objects, cookie and redirect handling, tracing hooks, timers), which
is most of what the gateway spends per request. The gateway needs much less: send bytes it
already has, parse the response with aiohttp's own C parser, hand the body over as aiohttp's
``StreamReader`` (so the relay and flow control are unchanged), and keep the connection for the
next request. IAM calls still go through ``ClientSession``: they are rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway._aiohttp import PARSED, finish, response_parser
from gateway.deadlines import Deadlines

READ_BUFSIZE = 2**16
# An idle connection is closed after this long (a timer, not only when the next request looks):
# upstreams and the load balancers in front of them close idle connections after a while, and
# closing first keeps the stale keep-alive race rare (issue 9). Routes set it (timeouts.pool_idle).
KEEPALIVE = 15.0
# Idle connections kept per pool; a connection finished beyond that is closed.
MAX_IDLE_PER_POOL = 256
# Sent once more when a reused connection closes before answering: the upstream may have acted
# on the request, which is harmless only for these (nginx and Go's client draw the same line).
IDEMPOTENT = frozenset({"GET", "HEAD"})

# Not allowed in a reason phrase or a field value (RFC 9110 §5.5: visible characters, SP and
# HTAB). aiohttp's parser lets them through (NUL, CR and LF excepted); 3.13's serializer would
# then pass them on to the client and 3.14's refuses them after the answer was counted as sent.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

ConnKey = tuple[str, str, str, int]  # (pool, scheme, host, port); a pool is a route


class ConnectFailed(OSError):
    """No connection could be made (refused, unreachable, DNS, TLS)."""


class ConnectTimedOut(TimeoutError):
    """No connection within the connect timeout."""


class ClosedBeforeResponse(ConnectionError):
    """The connection closed before a response's headers arrived.

    The upstream may have read the whole request and acted on it: only an idempotent request
    may be sent again after this.
    """


class NotSent(ClosedBeforeResponse):
    """The connection was gone before the request could be written: the upstream never got it."""


class BadResponse(ConnectionError):
    """The upstream's answer is not HTTP/1.x."""


class BadHeader(ValueError):
    """A header value would split the request (CR or LF in it, e.g. a token with a newline)."""


class UpstreamResponse:
    """Status, headers and a streaming body: the parts of aiohttp's ClientResponse we use."""

    __slots__ = (
        "_conn",
        "content",
        "content_length",
        "content_type",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection, message: Any, payload: aiohttp.StreamReader) -> None:
        self._conn = conn
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        raw_type = self.headers.get("Content-Type", "application/octet-stream")
        self.content_type = raw_type.split(";", 1)[0].strip().lower()
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def release(self) -> None:
        """Done with the response: keep the connection if its body was read to the end."""
        self._conn.finished(self.content.is_eof() and self.content.exception() is None)

    def close(self) -> None:
        self._conn.finished(False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the StreamReader's flow control drives its reading.

    A reader of its bodies may ask to be told of new bytes through ``on_body`` instead of its
    ``StreamReader``'s waiter (``notifies_body``): called once, with no argument, after a
    received read has been parsed whole, or the body ended or failed, as a waiter would be
    woken but without a future, a loop callback or one wake-up per chunk of the read.
    """

    notifies_body = True
    on_body: Callable[[], None] | None = None

    def __init__(self, pool: UpstreamClient, key: ConnKey, keepalive: float) -> None:
        self._pool = pool
        self.key = key
        self.keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._waiter: asyncio.Future[tuple[Any, aiohttp.StreamReader]] | None = None
        self._payload: aiohttp.StreamReader | None = None
        self._should_close = False
        self._reading_paused = False
        self.idle_since = 0.0  # loop time it was last given back to the pool
        self.expires_at = 0.0  # loop time after which this idle connection is closed
        self._poller: Any = None  # select.poll with this socket registered, made at first use

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection is not reusable
            self._should_close = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            messages = parser.feed_data(data)[PARSED]  # gateway._aiohttp.parse, inline
        except Exception:
            self._fail(BadResponse("the upstream's answer could not be parsed"))
            return
        for message, payload in messages:
            if message.code == 101:  # never asked for (no Upgrade is forwarded): not an answer
                self._fail(BadResponse("the upstream switched protocols unasked"))
                return
            if 100 <= message.code < 200:
                continue  # an interim answer; the real one follows on the same connection
            values = " ".join(message.headers.values())
            if not (values.isprintable() and message.reason.isprintable()) and (
                _CONTROL.search(values) or _CONTROL.search(message.reason)
            ):  # (isprintable: the cheap test, true for any head of visible ASCII)
                self._fail(BadResponse("the upstream sent a control character in its head"))
                return
            if message.should_close:
                self._should_close = True
            self._payload = payload
            waiter = self._waiter
            self._waiter = None
            if waiter is not None and not waiter.done():
                waiter.set_result((message, payload))
        notify = self.on_body
        if notify is not None:
            self.on_body = None
            notify()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._should_close = True
        self._pool.forget(self)
        parser, payload = self._parser, self._payload
        if (
            parser is not None
            and payload is not None
            and not payload.is_eof()
            and payload.exception() is None
        ):
            # Only a clean close (FIN) can end a body that runs until the connection closes; a
            # reset (``exc`` set) never ends a body, whatever its framing.
            if exc is None:
                with contextlib.suppress(Exception):  # an incomplete body is reported below
                    finish(parser)
            if not payload.is_eof():
                payload.set_exception(aiohttp.ClientPayloadError("the upstream closed mid-body"))
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClosedBeforeResponse("closed before answering"))
        self._notify()

    # --- what aiohttp's StreamReader expects of its protocol: liveness and flow control ------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- use -----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def peer_closed(self) -> bool:
        """True if anything is waiting to be read on this idle connection.

        An idle connection has nothing to read unless the upstream closed it (EOF or a reset,
        already in the socket but not yet seen by the event loop) or sent bytes nobody asked
        for; either way it must not carry another request (urllib3 checks the same way).
        """
        assert self.transport is not None
        poller = self._poller
        if poller is None:  # once per connection: one poll(2) per reuse after that
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return False
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def exchange(
        self, head: bytes, body: bytes, method: str, by: float | None = None
    ) -> tuple[Any, aiohttp.StreamReader]:
        """Send one request; the response's message and body reader once its headers are in
        (TimeoutError if they are not in by loop time ``by``; the connection is then closed)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise NotSent("the connection closed before the request was written")
        self._parser = response_parser(self, method, READ_BUFSIZE, self._loop)
        self._payload = None
        self.on_body = None
        self._should_close = False
        waiter = self._waiter = self._loop.create_future()
        entry = self._pool.deadlines.add(waiter, by) if by is not None else None
        transport.write(head + body if len(body) < 16384 else head)
        if len(body) >= 16384:
            transport.write(body)
        if transport.is_closing():
            # the send itself failed (asyncio and uvloop close the transport from inside
            # write() when the socket refuses it): the request did not reach the upstream whole
            self._waiter = None
            waiter.cancel()
            if entry is not None:
                Deadlines.forget(entry)
            raise NotSent("the request could not be written")
        try:
            message, payload = await waiter
        except BaseException:
            self._should_close = True
            self.close()
            raise
        finally:
            if entry is not None:
                Deadlines.forget(entry)  # the heap must not keep the outcome (deadlines.py)
        return message, payload

    def finished(self, reusable: bool) -> None:
        """The response is done with: back to the pool, or closed."""
        self.on_body = None  # whoever read the body is done with it
        if reusable and not self._should_close and self.usable:
            self._parser = None
            self._payload = None
            self._pool.give_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        self._should_close = True
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(aiohttp.ClientPayloadError(str(exc)))
            self._notify()
        self.close()

    def _notify(self) -> None:
        notify = self.on_body
        if notify is not None:
            self.on_body = None
            notify()


class UpstreamClient:
    """Keep-alive connections per (scheme, host, port); requests go out as prepared bytes."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_POOL) -> None:
        self._idle: dict[ConnKey, deque[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._max_idle = max_idle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None  # the next idle expiry, if any
        # the pools the serving config uses and their keepalive (None: any pool, as asked)
        self._wanted: dict[ConnKey, float] | None = None
        self._deadlines: Deadlines | None = None

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        connect_timeout: float,
        pool: str = "",
        keepalive: float = KEEPALIVE,
        first_byte: float = 0.0,
    ) -> UpstreamResponse:
        """Send a request and return once the response headers are in.

        With ``first_byte`` (seconds), they must be in that long after this call, connecting
        included, or TimeoutError is raised (``ConnectTimedOut`` when the connect timeout is
        the shorter bound and runs out).

        Connections are pooled per ``pool`` (the gateway passes the route's name) and closed
        after ``keepalive`` seconds unused.

        A connection the upstream closed while it was idle is noticed before reuse (EOF already
        in its socket) and not used. If a reused connection still closes before answering, the
        request is sent once more on a new connection only when that is safe: the write itself
        failed (the upstream never had the whole request), or the method is idempotent. A POST
        the upstream may have read and started is never run twice (issue 9).
        """
        key = pool_key(pool, url)
        head = _request_head(method, url, headers, body)
        by = self.loop.time() + first_byte if first_byte else None
        for attempt in (1, 2):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect_by(key, connect_timeout, keepalive, by)
            try:
                message, payload = await conn.exchange(head, body, method, by)
            except NotSent:
                if attempt == 1:
                    continue
                raise
            except ClosedBeforeResponse:
                if reused and attempt == 1 and method in IDEMPOTENT:
                    continue
                raise
            return UpstreamResponse(conn, message, payload)
        raise AssertionError("unreachable")

    def follow(self, pools: Mapping[str, tuple[URL, float]]) -> None:
        """Keep only the pools the serving config uses (name → (upstream, keepalive)).

        Called when a config starts serving (start-up and every reload): idle connections of a
        route that left the config or moved to another upstream are closed now (nothing will
        take them), those of a kept route are held to its current ``pool_idle`` from when they
        went idle, and a connection still in use under an older config is given back under the
        new one's rules, so a shortened ``pool_idle`` applies at once, not after the old one.
        """
        wanted = {pool_key(name, url): keepalive for name, (url, keepalive) in pools.items()}
        self._wanted = wanted
        for key, idle in list(self._idle.items()):
            keepalive = wanted.get(key)
            if keepalive is None:
                while idle:
                    idle.pop().close()
                del self._idle[key]
                continue
            for conn in idle:
                conn.keepalive = keepalive
                conn.expires_at = conn.idle_since + keepalive
            self._idle[key] = deque(sorted(idle, key=_expiry))
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._loop is not None:
            self._expire()

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()

    # --- the pool ---------------------------------------------------------------------------

    def sizes(self) -> dict[str, tuple[int, int]]:
        """Open connections per pool as (idle, active), for the metrics (read at scrape time)."""
        out: dict[str, tuple[int, int]] = {}
        for conn in self._all:
            idle, active = out.get(conn.key[0], (0, 0))
            out[conn.key[0]] = (idle, active + 1)
        for key, conns in self._idle.items():
            idle, active = out.get(key[0], (0, 0))
            out[key[0]] = (idle + len(conns), active - len(conns))
        return out

    def _take(self, key: ConnKey) -> _Connection | None:
        idle = self._idle.get(key)
        now = self._loop.time() if self._loop is not None else 0.0
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.usable and now < conn.expires_at and not conn.peer_closed():
                return conn
            conn.close()
        return None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this client runs on (found once, then remembered)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def deadlines(self) -> Deadlines:
        """The response-header deadlines of this client's requests, on one timer."""
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(self.loop)
        return deadlines

    def give_back(self, conn: _Connection) -> None:
        wanted = self._wanted
        if wanted is not None:
            keepalive = wanted.get(conn.key)
            if keepalive is None:  # its route left the config or moved: nobody will take it
                conn.close()
                return
            conn.keepalive = keepalive
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        conn.idle_since = now = loop.time()
        conn.expires_at = expires = now + conn.keepalive
        if idle and idle[-1].expires_at > expires:
            # a shorter keepalive than a connection already idle (a request from before a
            # reload that changed pool_idle): inserted in order, _expire relies on it
            at = len(idle) - 1
            while at and idle[at - 1].expires_at > expires:
                at -= 1
            idle.insert(at, conn)
        else:
            idle.append(conn)  # newest on the right: each deque is ordered by expiry
        sweep = self._sweep
        if sweep is None:
            self._sweep = loop.call_at(expires, self._expire)
        elif sweep.when() > expires:  # a pool with a shorter keepalive than the one scheduled
            sweep.cancel()
            self._sweep = loop.call_at(expires, self._expire)

    def _expire(self) -> None:
        """Close every idle connection past its time; one timer for the whole client, set for
        the next expiry, so an idle connection is closed on time even with no traffic at all."""
        self._sweep = None
        assert self._loop is not None
        now = self._loop.time()
        due: float | None = None
        for idle in self._idle.values():
            while idle and idle[0].expires_at <= now:
                idle.popleft().close()
            if idle and (due is None or idle[0].expires_at < due):
                due = idle[0].expires_at
        if due is not None:
            self._sweep = self._loop.call_at(due, self._expire)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    async def _connect_by(
        self, key: ConnKey, connect_timeout: float, keepalive: float, by: float | None
    ) -> _Connection:
        """A new connection, also within the first-byte deadline ``by`` (TimeoutError)."""
        if by is not None:
            left = by - self.loop.time()
            if left < connect_timeout:
                try:
                    return await self._connect(key, max(left, 0.0), keepalive)
                except ConnectTimedOut:
                    raise TimeoutError("the first-byte deadline passed while connecting") from None
        return await self._connect(key, connect_timeout, keepalive)

    async def _connect(
        self, key: ConnKey, connect_timeout: float, keepalive: float = KEEPALIVE
    ) -> _Connection:
        _, scheme, host, port = key
        loop = self._loop = asyncio.get_running_loop()
        conn = _Connection(self, key, keepalive)
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise ConnectTimedOut(f"no connection within {connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(exc.errno, type(exc).__name__) from None
        self._all.add(conn)
        return conn


def pool_key(pool: str, url: URL) -> ConnKey:
    """The pool a request to ``url`` for pool ``pool`` (a route's name) takes connections from."""
    return (pool, url.scheme, url.host or "", url.port or (443 if url.scheme == "https" else 80))


def _expiry(conn: _Connection) -> float:
    return conn.expires_at


def _request_head(method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> bytes:
    """Request line and headers; Host and Content-Length are the client's own business here.

    The values are checked for line breaks all at once and the lines joined in C (``": ".join``
    over the items); only values that hold a break are searched for the header to name.
    """
    values = "".join(headers.values())
    if "\n" in values or "\r" in values:
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise BadHeader(f"the value of header {name!r} contains a line break")
    lines = "\r\n".join(map(": ".join, headers.items()))
    head = f"{method} {url.raw_path_qs} HTTP/1.1\r\n"
    if "Host" not in headers:
        head += f"Host: {url.host_port_subcomponent}\r\n"
    if lines:
        head += lines + "\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("utf-8", "surrogateescape")
