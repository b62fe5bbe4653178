"""Copy an upstream response body to the client as it arrives: one write per upstream chunk.

The copy is driven by the upstream connection's ``data_received``: aiohttp's parser hands each
body chunk to the response's ``StreamReader``, which wakes its waiter; the relay installs itself
as that waiter, so the chunk goes to the client's transport from one plain callback, with no
task switch, no future and no timer per chunk. The gateway's own upstream connection
(gateway/http1.py) does better still: it calls the relay's pump itself once a read has been
parsed whole (the waiter's loop callback and its wake-ups are skipped; the chunks of one read
still go out in one write). When the client's socket buffer fills, the relay
stops taking chunks; the reader's buffer then fills and aiohttp pauses the upstream socket, so
memory stays bounded however fast the upstream and however slow the client.

One reusable timer handles the idle, total and heartbeat deadlines: it fires at the earliest of
them, finds out from the time of the last chunk whether anything is really due, and re-arms.

SSE framing is honoured only at the edges: heartbeats (``: keep-alive``) and the closing
``event: error`` are written only when the bytes relayed so far end on an event boundary (a blank
line, per the HTML spec's event-stream grammar: CRLF, LF or CR line ends). Inside a half-received
event the connection is closed instead, so a truncated stream never looks like a clean end.

Every SSE answer is watched for its ``usage`` (gateway/proxy/usage.py) at the cost of one
``endswith`` and one substring search of the chunk's last KiB; only a chunk that ends inside an
event or has ``"usage"`` near its end goes to the watcher, which may hold back or cut out bytes
when the gateway itself asked for usage (``include_usage``).
"""

from __future__ import annotations

import asyncio
import json
from bisect import bisect_left
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from gateway.metrics import GAP_BUCKETS, ChunkStats
from gateway.proxy.usage import EVENT_ENDS, TAIL, USAGE_KEY, UsageTap

HEARTBEAT = b": keep-alive\n\n"
_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n")

# end reason -> (error type, error code, message) of the closing `event: error`
_ERROR_EVENTS = {
    "idle_timeout": ("timeout", "upstream_idle_timeout", "the upstream sent nothing for too long"),
    "total_timeout": ("timeout", "upstream_total_timeout", "the request used up its total time"),
    "upstream_error": ("upstream_error", "upstream_error", "the upstream connection failed"),
    "shutdown": ("server_error", "shutdown", "the gateway is shutting down"),
}


def error_event(reason: str) -> bytes:
    type_, code, message = _ERROR_EVENTS[reason]
    data = json.dumps({"error": {"message": message, "type": type_, "code": code}})
    return f"event: error\ndata: {data}\n\n".encode()


def ends_event(prev: bytes, tail: bytes) -> bool:
    """True when the stream so far (``prev`` then ``tail``) ends on an SSE event boundary."""
    if not tail:
        return True
    end = tail[-4:] if len(tail) >= 4 else (prev[-4:] + tail)[-4:]
    return end.endswith(_BOUNDARIES)


class Sink(Protocol):
    """Where relayed bytes go: the client's connection."""

    def write(self, data: bytes) -> bool:
        """Send now, without waiting; raise OSError if the client is gone. True when the
        client's send buffer is full now (one call per chunk tells both)."""

    async def drain(self) -> None:
        """Wait until the client's send buffer has room again."""

    def abort(self) -> None:
        """Close the connection at once: the client must not see a clean end."""


class _Wake:
    """Installed as the StreamReader's waiter: aiohttp "wakes" it from ``data_received``.

    The reader only ever calls ``done()``, ``set_result()`` and ``set_exception()`` on its
    waiter (aiohttp.helpers.set_result / set_exception). The relay's pump runs from the event
    loop right after, not inside the parser's callback: reading the buffer may resume the
    upstream protocol, which re-enters the parser. A source whose connection says when a
    read has been parsed whole (the gateway's own, gateway/http1.py) calls ``ready`` then
    instead: outside the parser too, and without the loop callback.
    """

    __slots__ = ("_call_soon", "_failed", "_pump", "ready")

    def __init__(self, relay: Relay) -> None:
        self._call_soon = relay._loop.call_soon
        self._pump = relay._pump
        self._failed = relay._upstream_failed
        # what a source that is told of new bytes after they are parsed calls: the pump itself
        # (one object, so that ``unhook`` can tell it is still ours)
        self.ready = relay._pump

    def done(self) -> bool:
        return False

    def set_result(self, _: object) -> None:
        self._call_soon(self._pump)

    def set_exception(self, exc: BaseException) -> None:
        self._call_soon(self._failed)


class Source(Protocol):
    """Where relayed bytes come from: the upstream response's body."""

    hooked: bool
    """Set by ``take`` when it took the last of what was buffered and has already arranged,
    as ``settle`` would, for ``waker`` to be called when more comes."""

    def take(self, waker: _Wake) -> bytes:
        """Everything buffered now (b"" when nothing is); raises if the upstream failed."""

    def settle(self, waker: _Wake) -> bool | None:
        """After a take: True when the whole body has been taken, False when more is here
        already (or a failure: take again), else None, having arranged to call
        ``waker.set_result`` (data) or ``waker.set_exception`` (failure) when it comes, or
        ``waker.ready()`` for either once the bytes of a read are all in."""

    def unhook(self, waker: _Wake) -> None:
        """Stop calling ``waker``."""


class Relay:
    """One response body's copy; ``stop(reason)`` ends it from outside (timer, shutdown)."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        *,
        sse: bool,
        stats: ChunkStats,
        idle: float = 0.0,
        deadline: float | None = None,
        heartbeat: float = 0.0,
        on_heartbeat: Callable[[], None] | None = None,
        tap: UsageTap | None = None,
    ) -> None:
        self._source = source
        self._tap = tap
        self._sink = sink
        self._sse = sse
        self._stats = stats
        self._idle = idle
        self._deadline = deadline
        self._heartbeat = heartbeat if sse else 0.0
        self._on_heartbeat = on_heartbeat
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[str] = self._loop.create_future()
        self._wake = _Wake(self)
        self._timer: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._reason = ""
        self._blocked = False  # the client is not reading: upstream chunks wait in the reader
        self._last = self._last_beat = 0.0
        self._prev = self._tail = b""
        self.bytes = 0

    async def run(self) -> str:
        """Relay until the upstream ends or something stops it; returns the end reason."""
        self._last = self._last_beat = monotonic()
        self._arm(self._last)
        self._pump()  # what is buffered already; then wait for aiohttp to wake us
        try:
            return await self._done
        except asyncio.CancelledError:
            # Closing the client connection ourselves (to mark a cut stream) makes aiohttp
            # cancel the handler: that cancellation is ours, the end reason stands.
            task = asyncio.current_task()
            ours = self._reason and self._reason != "client_gone"
            if ours and task is not None and task.uncancel() == 0:
                return self._reason
            raise
        finally:
            self._close()

    def stop(self, reason: str) -> None:
        """End the relay with ``reason``, saying why inside the stream when it can."""
        if self._reason:
            return
        if self._blocked:
            # nothing can be said to a client that is not reading; if it is the idle clock that
            # ran out, it is the client that stalled, not the upstream
            self._sink.abort()
            self._finish("client_gone" if reason == "idle_timeout" else reason)
            return
        if self._sse and self.at_boundary:
            try:
                self._sink.write(error_event(reason))
            except OSError:
                self._finish("client_gone")
                return
        else:
            self._sink.abort()
        self._finish(reason)

    @property
    def at_boundary(self) -> bool:
        return ends_event(self._prev, self._tail)

    @property
    def last_bytes(self) -> bytes:
        """The last two chunks sent: where a large JSON answer keeps its ``usage``."""
        return self._prev + self._tail

    # --- the copy --------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move every buffered upstream chunk to the client, then wait to be woken again."""
        if self._reason or self._blocked:
            return
        source, sink, stats, tap = self._source, self._sink, self._stats, self._tap
        # the gap histogram, inline (ChunkStats.gap): one call less per chunk
        counts, bounds = stats.bucket_counts, GAP_BUCKETS
        wake = self._wake
        # find(key, -TAIL) searches the last TAIL bytes (all of a shorter chunk)
        ends, usage_key, tail = EVENT_ENDS, USAGE_KEY, -TAIL
        while True:
            try:
                chunk = source.take(wake)
            except Exception:  # whatever the upstream connection failed with
                self._upstream_failed()
                return
            if chunk:
                now = monotonic()
                gap = now - self._last
                counts[bisect_left(bounds, gap)] += 1
                stats.gap_sum += gap
                self._last = now
                # the usage watcher's test, inline: a method call would cost as much as the
                # test itself (`in` on bytes first tries the needle as an int: find() is cheaper)
                if tap is not None and (
                    tap.pending or not chunk.endswith(ends) or chunk.find(usage_key, tail) >= 0
                ):
                    chunk = tap.feed(chunk)  # usage read; hidden or held back when it is ours
            if chunk:
                size = len(chunk)
                stats.bytes += size
                self.bytes += size
                if size >= 4:
                    self._prev, self._tail = self._tail, chunk
                else:  # a tiny chunk: kept with the end of the last, so 4 adjacent bytes known
                    self._tail = self._tail[-4:] + chunk
                try:
                    full = sink.write(chunk)
                except OSError:
                    self._finish("client_gone")
                    return
                if full:
                    self._blocked = True
                    self._drainer = self._loop.create_task(self._wait_for_client())
                    return
            if source.hooked:  # take left nothing and hooked ``_wake``: the common case
                return
            # one call instead of a take that finds nothing, at_eof and wake: the end, more
            # already here (take again), or nothing yet (``_wake`` is hooked)
            ended = source.settle(wake)
            if ended is None:
                return
            if ended:
                break
        # the whole body is in and taken
        rest = tap.finish(self._prev[-3:] + self._tail) if tap and tap.pending else b""
        if rest:
            try:
                sink.write(rest)
            except OSError:
                self._finish("client_gone")
                return
            stats.bytes += len(rest)
            self.bytes += len(rest)
            self._prev, self._tail = self._tail, rest
        if self._sse and (not self.at_boundary or rest is None):
            # a body that ends inside an event (a close-delimited one cut by a FIN, or one
            # whose upstream just stopped there) is reported as the cut it is
            self._sink.abort()
            self._finish("upstream_error")
            return
        self._finish("done")

    async def _wait_for_client(self) -> None:
        try:
            await self._sink.drain()
        except OSError:
            self._finish("client_gone")
            return
        self._blocked = False
        self._drainer = None
        self._pump()

    def _upstream_failed(self) -> None:
        self.stop("upstream_error")

    def _finish(self, reason: str) -> None:
        if self._reason:
            return
        self._reason = reason
        self._unhook()
        if not self._done.done():
            self._done.set_result(reason)

    def _unhook(self) -> None:
        self._source.unhook(self._wake)

    def _close(self) -> None:
        if not self._reason:
            self._reason = "client_gone"  # cancelled from outside: a pump already queued is moot
        self._unhook()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()

    # --- the one timer --------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        when = self._deadline if self._deadline is not None else float("inf")
        if self._idle:
            when = min(when, self._last + self._idle)
        if self._heartbeat:
            when = min(when, max(self._last, self._last_beat) + self._heartbeat)
        if when != float("inf"):
            # +1 ms: event-loop timers may round down (uvloop counts whole milliseconds), and a
            # timer that fires early only re-arms itself
            self._timer = self._loop.call_later(max(when - now, 0.0) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._reason:
            return
        now = monotonic()
        if self._deadline is not None and now >= self._deadline:
            self.stop("total_timeout")
            return
        if self._idle and now - self._last >= self._idle:
            # blocked that long means the client stopped reading; else the upstream is silent
            self.stop("idle_timeout")
            return
        if self._heartbeat and now - max(self._last, self._last_beat) >= self._heartbeat:
            self._last_beat = now
            if not self._blocked and self.at_boundary:
                try:
                    self._sink.write(HEARTBEAT)
                except OSError:
                    self._finish("client_gone")
                    return
                if self._on_heartbeat is not None:
                    self._on_heartbeat()
        self._arm(now)
