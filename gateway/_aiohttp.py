"""Every use of aiohttp's private internals, and nothing else: the debt, paid in one place.

Tested on aiohttp 3.13.4 and 3.14.5, the two ends of the range ``pyproject.toml`` declares:
``.ci/run`` runs the whole suite and ``mypy --strict`` on both. Older releases break here
(3.10: no ``RequestHandler.writing_paused``; 3.11 to 3.13.2: ``_http_chunk_splits`` is a list;
3.13.3: no limit on the number of request header lines). The private names used:

- ``StreamReader``: ``_buffer``, ``_buffer_offset``, ``_size``, ``_cursor``, ``_http_chunk_splits``,
  ``_exception``, ``_protocol``, ``_waiter``, ``_eof``, ``_high_water``, ``_high_water_chunks``
  (:class:`ReaderSource`, the relay's zero-copy take and its wake-up hook), and the reader's
  ``__class__`` set to a subclass with lighter chunk callbacks (:class:`_RelayedReader`: the
  C parser calls ``begin_http_chunk_receiving``, ``feed_data`` and ``end_http_chunk_receiving``
  by name, and uses ``feed_data``'s return value on 3.14); ``aiohttp.helpers.set_result``;
- ``web_protocol.RequestHandler``: subclassed for ``connection_made``, ``connection_lost``,
  ``data_received`` and ``handle_error`` (its signature), and its ``_request_count``,
  ``_request_in_progress`` and ``_messages`` (is a request being handled, or queued: the header
  timer runs only between requests); ``_paused`` (what ``writing_paused`` returns) of its base
  ``BaseProtocol``, reached as ``request.protocol``; ``request.writer.drain()``;
- ``web_server.Server``: ``_loop`` and ``_kwargs`` (to build our handler as aiohttp builds its),
  its ``request_handler`` (``Application._handle``) wrapped to send some requests past the
  router (:class:`Direct`), and ``Request._match_info`` left unset for those;
  ``web_runner.AppRunner._make_server``, extended, and the server's ``__class__``: aiohttp offers
  no supported way to choose the protocol handler class (``Server`` builds ``RequestHandler``
  by name), so the server aiohttp made is given our subclass, keeping all its state;
- ``http_parser.HttpResponseParser``: its constructor, ``feed_data``'s ``(messages, upgraded,
  tail)`` return and ``feed_eof`` (:func:`response_parser`, :func:`parse`);
- ``web_response.StreamResponse``/``Response``: ``prepare`` and ``write_eof`` overridden, and
  their ``_status``, ``_reason``, ``_headers``, ``_body``, ``_keep_alive``, ``_eof_sent``,
  ``_payload_writer``, ``_req``, ``_must_be_empty_body``, ``_body_length``, ``_compression``,
  ``_cookies``, ``_chunked``, ``_zlib_executor_size`` and ``_zlib_executor``, and
  ``StreamResponse.__init__``'s ``_real_headers``; ``request._payload_writer``,
  ``Request._match_info`` and ``_prepare_hook``; ``http_writer._serialize_headers`` and
  ``helpers.rfc822_formatted_time``
  (:class:`WholeResponse`, which sends what aiohttp's own ``prepare`` would, in one write).

This module imports nothing of the gateway, so everything else may import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs, http_parser, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time, set_result
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from multidict import CIMultiDict

TESTED_RANGE = "3.13.4 to 3.14.5"

# Below this size a chunk and its chunked-encoding frame are joined into one buffer (one copy is
# cheaper than a scatter write); above it they go out as a list (aiohttp draws the same line).
_JOIN_BELOW = 2048
# the chunk-size lines of the joined sizes, made once: a table look-up and two concatenations
# cost a third of a ``b"%x\r\n%b\r\n"`` format per chunk
_SIZE_LINES = tuple(b"%x\r\n" % size for size in range(_JOIN_BELOW))


def c_extensions_missing() -> str | None:
    """Why aiohttp's C HTTP parser is not in use, or None when it is.

    The pure-Python parser accepts what the C one refuses (``HTTP/9.9``, raw 0xFF bytes in the
    query), so the gateway's promises about malformed requests hold only with the C parser.
    """
    if http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser":
        return None
    return (
        "aiohttp's C extensions are not loaded (AIOHTTP_NO_EXTENSIONS is set, or aiohttp was "
        "installed without its compiled parser): the gateway refuses to start without them, "
        "since the pure-Python parser accepts malformed requests; unset AIOHTTP_NO_EXTENSIONS "
        "or install aiohttp from a binary wheel"
    )


# --- the server side: our protocol handler ------------------------------------------------------


class _GatewayRequestHandler(RequestHandler):
    """aiohttp's protocol handler with three changes.

    Unparsable requests are answered by ``error_response`` (the gateway's JSON error shape):
    aiohttp's own 400 is text/plain and quotes the offending bytes back, which may be a header
    line holding a credential.

    A connection whose request headers are not complete within ``header_timeout`` of their first
    byte (of the connection, for the first request) is closed, for every request on it (aiohttp
    has no such limit): a client trickling headers a byte at a time would otherwise hold its
    socket for ever, and enough of them would exhaust file descriptors.

    Beyond ``max_connections`` open connections a new one is closed at once (``on_refused`` is
    called), before it can hold anything; connections already open are untouched.
    """

    header_timeout = 0.0
    error_response: Callable[[int], web.Response]
    server: _GatewayServer
    _header_timer: asyncio.TimerHandle | None = None
    _header_count = 0  # _request_count when the timer was armed
    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self.server
        server.open_connections += 1
        self._counted = True
        if server.open_connections > server.max_connections:
            server.on_refused()
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if self.header_timeout:
            self._header_count = self._request_count
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._headers_too_slow
            )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        timer = self._header_timer
        if timer is not None:
            if self._request_count != self._header_count:  # the headers are complete
                timer.cancel()
                self._header_timer = None
        elif not self._request_in_progress and not self._messages:
            self._arm()  # the first bytes of the next request on this connection

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._request_count == self._header_count and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._counted:
            self._counted = False
            self.server.open_connections -= 1
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, None)  # logs (redacted) and may raise
        response = self.error_response(status)
        response.force_close()
        return response


class _GatewayServer(Server):
    header_timeout = 0.0
    error_response: Callable[[int], web.Response]
    max_connections = 1 << 30
    on_refused: Callable[[], None] = staticmethod(lambda: None)
    open_connections = 0

    def __call__(self) -> RequestHandler:
        handler = _GatewayRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        handler.error_response = self.error_response
        handler.server = self
        return handler


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose connections use the gateway's protocol handler."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout: float,
        error_response: Callable[[int], web.Response],
        max_connections: int = 1 << 30,
        on_refused: Callable[[], None] = lambda: None,
        direct: Direct | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout
        self._error_response = error_response
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._direct = direct

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _GatewayServer  # same state, our protocol handler factory
        assert isinstance(server, _GatewayServer)
        server.header_timeout = self._header_timeout
        server.error_response = self._error_response
        server.max_connections = self._max_connections
        server.on_refused = self._on_refused
        server.open_connections = 0
        if self._direct is not None:
            server.request_handler = _dispatch(self._direct, server.request_handler)
        return server


class Direct(Protocol):
    """Requests that only one handler of the application can take, and that handler."""

    def wants(self, request: web.BaseRequest) -> bool: ...

    def handle(self, request: web.Request) -> Awaitable[web.StreamResponse]: ...


def _dispatch(
    direct: Direct, app_handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The server's request handler: ``direct``'s requests straight to its handler, every
    other one through the application (router, expect handler, middlewares).

    ``Application._handle`` costs ~10k instructions per request before the handler runs
    (``get_event_loop()``, a getpid() system call on Python 3.11; the router's resolve; the
    match info; the middleware chain), for an answer known from the method alone. A request
    handled directly has no match info (``request.app`` is not set): its handler must not need
    it, nor ``on_response_prepare`` signals (aiohttp skips them without match info).
    """
    wants = direct.wants
    handle: Callable[[Any], Awaitable[web.StreamResponse]] = direct.handle  # a web.Request

    def request_handler(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        return handle(request) if wants(request) else app_handle(request)

    return request_handler


class ClientSink:
    """A prepared aiohttp response, written through its transport directly.

    The response headers are already on the wire (``StreamResponse.prepare`` sends them), so
    body bytes may bypass aiohttp's writer; chunked framing is added here when the response uses
    it, and aiohttp's ``write_eof`` still writes the last chunk. Failures are ``OSError``s.
    """

    __slots__ = ("_chunked", "_delimited", "_protocol", "_request", "_transport")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._transport = request.transport
        self._protocol = request.protocol
        # set by prepare(): HTTP/1.1 without a Content-Length is chunked
        self._chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        # neither chunked nor a length (an HTTP/1.0 client, nginx's default proxy_http_version):
        # the body ends where the connection does
        self._delimited = not self._chunked and response.content_length is None

    def write(self, data: bytes) -> bool:
        """Send ``data`` now; True when the client's send buffer is full after it (aiohttp's
        ``writing_paused``, read as its ``_paused`` slot: a property call less per chunk)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        if not self._chunked:
            transport.write(data)
        elif len(data) < _JOIN_BELOW:
            transport.write(_SIZE_LINES[len(data)] + data + b"\r\n")
        else:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        return self._protocol._paused

    async def drain(self) -> None:
        try:
            await self._request.writer.drain()
        except aiohttp.ClientError as exc:
            raise ConnectionResetError(str(exc)) from None

    def abort(self) -> None:
        """Close at once; a body that ends with the connection is ended by a reset (RST).

        A FIN would be that body's clean end, so a client reading it (HTTP/1.0, or nginx with
        its default ``proxy_http_version 1.0``) could not tell a cut stream from a whole one.
        Chunked and Content-Length bodies keep the FIN: their framing already tells, and a
        reset could make the client's kernel drop bytes it has received but not yet read.
        """
        transport = self._transport
        if transport is None:
            return
        if self._delimited:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):  # already gone: nothing to tell apart
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


# --- the client side: a small answer in one write ---------------------------------------------

# aiohttp's must_be_empty_body() is false for every answer the fast path takes: any other method
# or status (HEAD, CONNECT, 1xx, 204, 304) goes through aiohttp's own prepare()
_EMPTY_BODY_METHODS = frozenset((hdrs.METH_HEAD, hdrs.METH_CONNECT))
# Response's default for a body compressed in one go (3.13: None, 3.14: a size)
_ZLIB_EXECUTOR_SIZE: Any = (web.Response.__init__.__kwdefaults__ or {}).get("zlib_executor_size")


class WholeResponse(web.Response):
    """A ``web.Response`` whose status line, headers and body leave in one ``transport.write``.

    aiohttp's ``prepare`` and ``write_eof`` take ~a dozen coroutines and calls per answer
    (``_start`` twice, ``_prepare_headers``, ``_write_headers``, the writer's ``write_headers``,
    ``write_eof`` three times, ``_send_headers_with_payload``, ``_writelines``, ``drain``).
    This does the same work in one call: the same headers in the same order (Content-Length,
    Content-Type's default, Date, Server, Connection from the response's or the request's
    keep-alive and the HTTP version), the same serializer (which refuses the control characters
    its aiohttp release refuses in a header: 3.14 more than 3.13), the ``on_response_prepare``
    hook for routed requests, the same error when the client is gone, and the same wait in
    ``write_eof`` while the client does not read (backpressure). Anything else (a body that
    must be empty, compression, cookies, chunking, a preset Content-Length, a payload object,
    an HTTP version other than 1.0 and 1.1) takes aiohttp's own path.
    """

    _whole = False  # sent by prepare(): write_eof() only waits for the client to read

    def __init__(
        self,
        *,
        status: int,
        body: bytes,
        headers: CIMultiDict[str],
        reason: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """``Response(status=, reason=, body=, headers=, content_type=)``, taking ``headers``
        as its own instead of copying them (they must not be used elsewhere afterwards)."""
        # Response.__init__ for a bytes body, less the copy of the headers and its checks
        web.StreamResponse.__init__(self, status=status, reason=reason, _real_headers=headers)
        if content_type is not None:
            headers[hdrs.CONTENT_TYPE] = content_type
        self._body = body
        self._zlib_executor_size = _ZLIB_EXECUTOR_SIZE
        self._zlib_executor = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the whole answer now (aiohttp's own ``prepare`` only for the cases above)."""
        status = self._status
        headers = self._headers
        body = self._body
        version = request.version
        if (
            self._payload_writer is not None
            or self._eof_sent
            or status < 200
            or status == 204
            or status == 304
            or request.method in _EMPTY_BODY_METHODS
            or not isinstance(body, (bytes, bytearray))
            or (version != HttpVersion11 and version != HttpVersion10)
            or self._compression
            or self._chunked
            or self._cookies
            or hdrs.CONTENT_LENGTH in headers
        ):
            return await super().prepare(request)
        self._must_be_empty_body = False
        self._req = request
        writer = self._payload_writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        # Response._start, then StreamResponse._prepare_headers, in their order
        size = len(body)
        headers[hdrs.CONTENT_LENGTH] = str(size)
        if size:
            headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
        if hdrs.CONNECTION not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers[hdrs.CONNECTION] = "keep-alive"
            elif version == HttpVersion11:
                headers[hdrs.CONNECTION] = "close"
        if getattr(request, "_match_info", None) is not None:  # routed: on_response_prepare
            await request._prepare_hook(self)
        data = _serialize_headers(
            f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}", headers
        )
        if body:
            data += body
        transport = request.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        transport.write(data)
        writer.buffer_size += len(data)
        writer.output_size += len(data)
        self._whole = True
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        """Wait while the client is not reading; the bytes left in ``prepare``."""
        if not self._whole or self._eof_sent:
            return await super().write_eof(data)
        writer = self._payload_writer
        assert writer is not None
        if self._req is not None and self._req.protocol.writing_paused:
            await writer.drain()  # the client is not reading: wait, as aiohttp's write_eof does
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None


# --- the body of an upstream response --------------------------------------------------------


class Waker(Protocol):
    """What a StreamReader calls on its waiter (aiohttp.helpers.set_result / set_exception),
    and ``ready``: what a protocol that ``notifies_body`` calls instead."""

    ready: Callable[[], None]

    def done(self) -> bool: ...

    def set_result(self, result: object) -> None: ...

    def set_exception(self, exc: BaseException) -> None: ...


class _RelayedReader(aiohttp.StreamReader):
    """A ``StreamReader`` whose body is being relayed: the parser's calls per HTTP chunk
    (``begin_http_chunk_receiving``, ``feed_data``, ``end_http_chunk_receiving``) cost less.

    The chunk boundaries aiohttp keeps serve only ``readchunk()``, which nothing calls on a
    relayed body: the begin and end calls are ``NoneType`` itself (a C call that returns None,
    where a Python method is a frame each, twice per event). Their one other job, pausing the
    upstream when too many small chunks wait in the buffer (a slow client, an upstream sending
    tiny chunks), moves into ``feed_data``, which counts the buffered chunks instead.
    """

    __slots__ = ()

    begin_http_chunk_receiving = type(None)
    end_http_chunk_receiving = type(None)

    def feed_data(self, data: bytes, size: int = 0) -> Any:
        """aiohttp's ``feed_data``, with the paused check of ``end_http_chunk_receiving``."""
        if not data:
            return False
        n = len(data)
        self._size += n
        buffer = self._buffer
        buffer.append(data)
        self.total_bytes += n
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            set_result(waiter, None)
        if (
            self._size > self._high_water or len(buffer) > self._high_water_chunks
        ) and not self._protocol._reading_paused:
            self._protocol.pause_reading()
        return False  # 3.14's parser: no more data is waiting in a decompressor


class ReaderSource:
    """An upstream body (aiohttp's ``StreamReader``) as the relay reads it."""

    __slots__ = ("_notifier", "hooked", "reader")

    def __init__(self, reader: aiohttp.StreamReader) -> None:
        if type(reader) is aiohttp.StreamReader:  # not EMPTY_PAYLOAD, not a subclass
            reader.__class__ = _RelayedReader  # same slots: every state of the reader is kept
        self.reader = reader
        # the gateway's upstream connection (http1) calls ``on_body`` once a read is parsed,
        # so the relay needs no waiter: no future, no loop callback, one wake per read
        protocol = reader._protocol
        self._notifier: Any = protocol if getattr(protocol, "notifies_body", False) else None
        self.hooked = False

    def take(self, waker: Waker) -> bytes:
        """Everything buffered (b"" when empty), like ``read_nowait(-1)``; raises on failure.

        The common case, one whole chunk while the upstream is flowing, is taken straight off
        the reader's buffer: ``read_nowait`` would also call the protocol's ``resume_reading()``
        on every read, which re-runs the parser and the transport's resume, a few microseconds
        per event for nothing; and as that leaves nothing buffered in a body still running,
        ``waker`` is hooked for what comes next (``hooked``: no ``settle`` call needed). Any
        other case (partly read buffer, several chunks, a paused upstream, an error, the end)
        goes through ``read_nowait`` itself, and ``settle`` decides.
        """
        source = self.reader
        buffer = source._buffer
        if (
            len(buffer) != 1
            or source._buffer_offset
            or source._exception is not None
            or source._eof
            or source._protocol._reading_paused
        ):
            self.hooked = False
            return source.read_nowait(-1) if buffer or source._exception is not None else b""
        data = buffer.popleft()
        size = len(data)
        source._size -= size
        source._cursor += size
        splits = source._http_chunk_splits
        while splits and splits[0] < source._cursor:
            splits.popleft()
        notifier = self._notifier
        if notifier is not None:
            notifier.on_body = waker.ready
        else:
            source._waiter = waker  # type: ignore[assignment]
        self.hooked = True
        return data

    def settle(self, waker: Waker) -> bool | None:
        """True at the end of the body, all taken; False when there is more to take now (or
        a failure to raise); else None, ``waker`` called, instead of a future, once data or
        an error arrives."""
        reader = self.reader
        if reader._buffer or reader._exception is not None:
            return False
        if reader._eof:
            return True
        notifier = self._notifier
        if notifier is not None:
            notifier.on_body = waker.ready
        else:
            reader._waiter = waker  # type: ignore[assignment]
        self.hooked = True
        return None

    def unhook(self, waker: Waker) -> None:
        self.hooked = False
        notifier = self._notifier
        if notifier is not None and notifier.on_body is waker.ready:
            notifier.on_body = None
        if self.reader._waiter is waker:  # type: ignore[comparison-overlap]
            self.reader._waiter = None


def response_parser(
    protocol: Any, method: str, read_bufsize: int, loop: asyncio.AbstractEventLoop | None = None
) -> Any:
    """aiohttp's (C) response parser, feeding bodies into StreamReaders on ``protocol``.

    ``protocol`` needs only the flow-control part of ``BaseProtocol``: ``pause_reading``,
    ``resume_reading``, ``_reading_paused`` and ``connected``. Pass the ``loop`` when it is
    known: on Python 3.11 each ``get_running_loop()`` costs a ``getpid()`` system call.
    """
    return http_parser.HttpResponseParser(
        protocol,
        loop or asyncio.get_running_loop(),
        read_bufsize,
        response_with_body=method != "HEAD",
        read_until_eof=True,
        auto_decompress=False,
        payload_exception=aiohttp.ClientPayloadError,
    )


def parse(parser: Any, data: bytes) -> list[tuple[Any, aiohttp.StreamReader]]:
    """The (message, body reader) pairs whose headers ``data`` completes."""
    return parser.feed_data(data)[PARSED]  # type: ignore[no-any-return]


# Where ``feed_data(data)`` puts those pairs in its ``(messages, upgraded, tail)`` result: the
# upstream connection calls ``parser.feed_data(data)[PARSED]`` itself, once per read, which
# saves the frame of ``parse`` on every relayed event.
PARSED = 0


def finish(parser: Any) -> None:
    """The connection closed: completes a body that runs until then (raises if it cannot)."""
    parser.feed_eof()
