"""A fake OpenAI-style upstream, cheap enough per event that it is never the bottleneck.

A raw ``asyncio.Protocol`` HTTP/1.1 server (keep-alive, chunked responses) that serves only
``POST /v1/infers/bench/v1/chat/completions`` and only with the benchmark's ``X-Auth-Token``
(so a proxy that forgets to inject it fails loudly). The JSON body says what to send::

    {"stream": true, "bench": {"events": 200, "interval_ms": 20, "size": 200}}

Paced streams use one ``call_at`` timer per event on an absolute schedule (no drift); unpaced
streams write as fast as the socket takes them and stop at the transport's high-water mark, so
a slow reader makes the upstream wait instead of buffering. Each event carries its send time
(see ``common.py``). Run: ``python benchmarks/upstream.py --port 0``; prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable

from common import (
    COMPLETION_HEAD,
    COMPLETION_SIZE,
    COMPLETION_TAIL,
    DONE,
    MIN_EVENT_SIZE,
    TOKEN,
    UPSTREAM_PATH,
    event_overhead,
    install_uvloop,
    raise_nofile,
)

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
MAX_EVENTS = 1_000_000
UNPACED_BATCH = 64  # events written per loop turn before yielding to other connections

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
DONE_CHUNK = b"%x\r\n%b\r\n" % (len(DONE), DONE)
EVENT_TAIL = b'"}\n\n\r\n'


class Padding:
    """Padding bytes per length, built once (a stream uses only a few distinct lengths)."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def get(self, length: int) -> bytes:
        pad = self._cache.get(length)
        if pad is None:
            pad = self._cache[length] = b"x" * length
        return pad


def _response(status: str, body: bytes, keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: %b\r\n\r\n%b" % (status.encode(), len(body), connection, body)
    )


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at ``start``: (body, end) or None if incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # trailers, usually none
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
        if len(body) > MAX_BODY:
            raise ValueError("body too large")


class StreamJob:
    """One SSE response: ``events`` events of ``size`` bytes, every ``interval`` seconds."""

    __slots__ = ("conn", "events", "handle", "i", "interval", "keep_alive", "size", "t0")

    def __init__(
        self, conn: UpstreamProtocol, events: int, interval: float, size: int, keep_alive: bool
    ) -> None:
        self.conn = conn
        self.events = events
        self.interval = interval
        self.size = size
        self.keep_alive = keep_alive
        self.i = 0
        self.t0 = 0.0
        self.handle: asyncio.Handle | None = None

    def start(self) -> None:
        self.conn.transport.write(STREAM_HEAD)
        loop = self.conn.loop
        if self.interval > 0:
            self.t0 = loop.time()
            self.paced()
        else:
            self.pump()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _event(self) -> bytes:
        i = self.i
        self.i = i + 1
        pad = self.conn.server.padding.get(self.size - event_overhead(i))
        head = b'%x\r\ndata: {"t":%d,"i":%d,"p":"' % (self.size, time.time_ns(), i)
        return b"".join((head, pad, EVENT_TAIL))

    def paced(self) -> None:
        self.handle = None
        self.conn.transport.write(self._event())
        if self.i >= self.events:
            self.finish()
        else:
            when = self.t0 + self.i * self.interval
            self.handle = self.conn.loop.call_at(when, self.paced)

    def pump(self) -> None:
        self.handle = None
        conn = self.conn
        write = conn.transport.write
        for _ in range(UNPACED_BATCH):
            write(self._event())
            if self.i >= self.events:
                self.finish()
                return
            if conn.paused:
                conn.on_resume = self.pump  # resume_writing() continues the stream
                return
        self.handle = conn.loop.call_soon(self.pump)

    def finish(self) -> None:
        self.conn.transport.write(DONE_CHUNK + LAST_CHUNK)
        self.conn.response_done(self.keep_alive)


class Server:
    """Shared state of the upstream: padding cache and counters."""

    def __init__(self) -> None:
        self.padding = Padding()
        self.requests = 0
        self.aborted = 0


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), one response at a time."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.buf = bytearray()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.job: StreamJob | None = None
        self.busy = False
        self.paused = False
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job = None
            self.server.aborted += 1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.next_request()

    def response_done(self, keep_alive: bool) -> None:
        self.job = None
        self.busy = False
        if not keep_alive:
            self.transport.close()
        elif self.buf:
            self.loop.call_soon(self.next_request)

    def next_request(self) -> None:
        if self.busy or self.transport.is_closing():
            return
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.transport.close()
            return
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self.transport.close()
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                got = _dechunk(buf, end + 4)
                if got is None:
                    return
                body, consumed = got
            else:
                length = int(headers.get("content-length", "0"))
                if length > MAX_BODY:
                    raise ValueError("body too large")
                if len(buf) < end + 4 + length:
                    return
                body, consumed = bytes(buf[end + 4 : end + 4 + length]), end + 4 + length
        except ValueError:
            self.transport.write(_response("400 Bad Request", b'{"error":"bad body"}', False))
            self.transport.close()
            return
        del buf[:consumed]
        self.busy = True
        self.server.requests += 1
        self.dispatch(method, target, headers, body, keep_alive)

    def dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        if method != "POST" or target.split("?", 1)[0] != UPSTREAM_PATH:
            return self.reply("404 Not Found", b'{"error":"not found"}', keep_alive)
        if headers.get("x-auth-token") != TOKEN:
            return self.reply("401 Unauthorized", b'{"error":"no token"}', keep_alive)
        try:
            request = json.loads(body)
            bench = request.get("bench") or {}
            events = min(int(bench.get("events", 10)), MAX_EVENTS)
            interval = max(float(bench.get("interval_ms", 0)), 0.0) / 1000
            size = max(int(bench.get("size", 200)), MIN_EVENT_SIZE)
            stream = bool(request.get("stream"))
        except (ValueError, TypeError, AttributeError):
            return self.reply("400 Bad Request", b'{"error":"bad json"}', keep_alive)
        if not stream:
            payload = b"%b%d%b" % (COMPLETION_HEAD, time.time_ns(), COMPLETION_TAIL)
            assert len(payload) == COMPLETION_SIZE
            return self.reply("200 OK", payload, keep_alive)
        self.job = StreamJob(self, events, interval, size, keep_alive)
        self.job.start()
        return None

    def reply(self, status: str, body: bytes, keep_alive: bool) -> None:
        self.transport.write(_response(status, body, keep_alive))
        self.response_done(keep_alive)


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = Server()
    listener = await loop.create_server(
        lambda: UpstreamProtocol(server, loop), host, port, backlog=4096
    )
    bound = listener.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with listener:
        await stop.wait()
    print(f"upstream: {server.requests} requests, {server.aborted} aborted", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake upstream listens on loopback only")
    raise_nofile()
    install_uvloop()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
