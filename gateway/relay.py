"""Copy an upstream response body to the client as it arrives: one write per upstream chunk.

The hot loop does no parsing and arms no timer per chunk. One reusable timer handles the idle,
total and heartbeat deadlines: it fires at the earliest of them, finds out from the time of the
last chunk whether anything is really due, and re-arms itself.

SSE framing is honoured only at the edges: heartbeats (``: keep-alive``) and the closing
``event: error`` are written only when the bytes relayed so far end on an event boundary (a blank
line, per the HTML spec's event-stream grammar: CRLF, LF or CR line ends). Inside a half-received
event the connection is closed instead, so a truncated stream never looks like a clean end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from time import monotonic

import aiohttp

from gateway.metrics import ChunkStats

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


class Relay:
    """One response body's copy loop; ``stop(reason)`` ends it from outside (timer, shutdown)."""

    def __init__(
        self,
        source: aiohttp.StreamReader,
        write: Callable[[bytes], Awaitable[None]],
        abort: Callable[[], None],
        *,
        sse: bool,
        stats: ChunkStats,
        idle: float = 0.0,
        deadline: float | None = None,
        heartbeat: float = 0.0,
        on_heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._write = write
        self._abort = abort
        self._sse = sse
        self._stats = stats
        self._idle = idle
        self._deadline = deadline
        self._heartbeat = heartbeat if sse else 0.0
        self._on_heartbeat = on_heartbeat
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._reason = ""
        self._reading = False
        self._last = self._last_beat = 0.0
        self._prev = self._tail = b""
        self.bytes = 0

    async def run(self) -> str:
        """Relay until the upstream ends or something stops it; returns the end reason."""
        self._task = asyncio.current_task()
        self._last = self._last_beat = monotonic()
        self._arm(self._last)
        source, write, stats = self._source, self._write, self._stats
        gap = stats.gap
        try:
            while True:
                self._reading = True
                chunk = await source.readany()
                self._reading = False
                if not chunk:
                    return "done"
                now = monotonic()
                gap(now - self._last)
                size = len(chunk)
                stats.bytes += size
                self.bytes += size
                self._last = now
                self._prev, self._tail = self._tail, chunk
                await write(chunk)
        except asyncio.CancelledError:
            task = self._task
            if not self._reason or task is None or task.uncancel() > 0:
                raise
            return await self._end(self._reason)
        except (aiohttp.ClientError, OSError):
            if self._reading:
                return await self._end("upstream_error")
            return "client_gone"
        finally:
            self._disarm()

    def stop(self, reason: str) -> None:
        """End the relay with ``reason``; the loop sees it as a cancellation it owns."""
        if self._reason or self._task is None:
            return
        self._reason = reason
        self._task.cancel()

    @property
    def at_boundary(self) -> bool:
        return ends_event(self._prev, self._tail)

    async def _end(self, reason: str) -> str:
        """Say why the stream ends, inside the stream, or close the connection if it cannot."""
        if reason == "client_gone":
            return reason
        if self._sse and self.at_boundary:
            try:
                await self._write(error_event(reason))
            except (aiohttp.ClientError, OSError):
                return "client_gone"
            # the event says it all; the body itself ends cleanly
            return reason
        self._abort()
        return reason

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

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._beat_task is not None and not self._beat_task.done():
            self._beat_task.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        if self._reason:
            return
        now = monotonic()
        if self._deadline is not None and now >= self._deadline:
            self.stop("total_timeout")
            return
        if self._idle and now - self._last >= self._idle:
            # blocked writing for that long means the client stopped reading
            self.stop("idle_timeout" if self._reading else "client_gone")
            return
        if self._heartbeat and now - max(self._last, self._last_beat) >= self._heartbeat:
            self._last_beat = now
            if self._reading and self.at_boundary and self._beat_task is None:
                self._beat_task = self._loop.create_task(self._beat())
        self._arm(now)

    async def _beat(self) -> None:
        try:
            # re-checked: a chunk may have been written since the timer fired
            if self._reading and self.at_boundary and not self._reason:
                await self._write(HEARTBEAT)
                if self._on_heartbeat is not None:
                    self._on_heartbeat()
        except (aiohttp.ClientError, OSError):
            pass  # the relay loop finds out about a gone client itself
        finally:
            self._beat_task = None
