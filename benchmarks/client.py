"""A cheap load client: raw asyncio HTTP/1.1, minimal chunked and SSE parsing, one process.

It runs one scenario against one target and prints one JSON line with what it saw: events and
bytes received against what the upstream sends, delivery delay (receive time - the event's
send time ``t``), time to first event (streams) or first byte (requests), throughput and errors.
For a scenario with many streams it prints ``OPEN`` once every stream has its first event, so
the runner can read the proxy's memory with all of them open.

Every run is bounded: ``requests`` or ``streams`` in count, ``deadline_s`` in time.
Run: ``python benchmarks/client.py --port P --path /v1/chat/completions --spec '{...}'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from common import (
    COMPLETION_HEAD,
    COMPLETION_SIZE,
    DONE,
    EVENT_HEAD,
    T_END,
    T_START,
    TOKEN,
    TOKEN_HEADER,
    install_uvloop,
    raise_nofile,
    stream_body_size,
)

MAX_HEAD = 64 * 1024
MAX_LINE = 4096
# chunked-decoder states
SIZE, DATA, DATA_CRLF, TRAILER = range(4)
# framing of a response body
CHUNKED, LENGTH, CLOSE = range(3)


@dataclass
class Spec:
    """One scenario as the client runs it."""

    mode: str  # "stream" or "request"
    streams: int = 1
    events: int = 10
    interval_ms: float = 0
    size: int = 200
    requests: int = 0
    concurrency: int = 1
    deadline_s: float = 60
    ramp: int = 100  # at most this many requests waiting for response headers at once
    signal_open: bool = False


@dataclass
class Stats:
    """What every connection of the scenario adds to."""

    delays: list[int] = field(default_factory=list)
    ttfb: list[int] = field(default_factory=list)
    latency: list[int] = field(default_factory=list)
    events: int = 0
    bytes: int = 0
    responses_ok: int = 0
    first_events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    open_at: float | None = None


class Conn(asyncio.Protocol):
    """One connection; one exchange at a time; completes ``done`` with None or an error kind."""

    def __init__(self, stats: Stats, on_first_event: Callable[[], None] | None = None) -> None:
        self.stats = stats
        self.on_first_event = on_first_event
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.head_seen: asyncio.Future[None] | None = None
        self.done: asyncio.Future[str | None] | None = None
        self.stream = False
        self.in_body = False
        self.framing = CLOSE
        self.keep_alive = True
        self.events = 0
        self.body_bytes = 0
        self.expected_events = 0

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self.framing == CLOSE and self.in_body:
                self._finish(time.time_ns())
            else:
                self._fail("reset")

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            return  # nothing asked for; a proxy has no business sending
        now = time.time_ns()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._fail("bad_head")
                return
            if not self._parse_head(end, now):
                return
            data = bytes(self.head[end + 4 :])
            self.head.clear()
            if not data:
                return
        if self.framing == CHUNKED:
            self._chunked(data, now)
        elif self.framing == LENGTH:
            take = min(self.remaining, len(data))
            self._body(data if take == len(data) else data[:take], now)
            self.remaining -= take
            if self.remaining == 0:
                self._finish(now)
        else:
            self._body(data, now)

    # --- one exchange ------------------------------------------------------------------------

    def send(
        self, request: bytes, stream: bool, size: int, t_start: int
    ) -> asyncio.Future[str | None]:
        """Write ``request``; the returned future completes when the response has been read."""
        loop = asyncio.get_running_loop()
        self.head_seen = loop.create_future()
        self.done = loop.create_future()
        self.stream = stream
        self.size = size
        self.t_start = t_start
        self.head = bytearray()
        self.in_body = False
        self.framing = CLOSE
        self.keep_alive = True
        self.status = 0
        self.remaining = 0
        self.cstate = SIZE
        self.line = bytearray()
        self.sse = bytearray()
        self.scan = 0
        self.events = 0
        self.body_bytes = 0
        self.saw_done = False
        self.body = bytearray()
        assert self.transport is not None
        self.transport.write(request)
        return self.done

    def _parse_head(self, end: int, now: int) -> bool:
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail("bad_head")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep_alive = headers.get("connection") != "close" and lines[0].startswith("HTTP/1.1")
        if "chunked" in headers.get("transfer-encoding", ""):
            self.framing = CHUNKED
        elif "content-length" in headers:
            self.framing = LENGTH
            self.remaining = int(headers["content-length"])
        else:
            self.framing = CLOSE
            self.keep_alive = False
        self.in_body = True
        if not self.stream:
            self.stats.ttfb.append(now - self.t_start)
        assert self.head_seen is not None
        if not self.head_seen.done():
            self.head_seen.set_result(None)
        if self.framing == LENGTH and self.remaining == 0:
            self._finish(now)
            return False
        return True

    def _chunked(self, data: bytes, now: int) -> None:
        pos, n = 0, len(data)
        while pos < n:
            state = self.cstate
            if state == DATA:
                take = min(self.remaining, n - pos)
                self._body(data if take == n else data[pos : pos + take], now)
                self.remaining -= take
                pos += take
                if self.remaining == 0:
                    self.cstate, self.remaining = DATA_CRLF, 2
            elif state == DATA_CRLF:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.cstate = SIZE
            else:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self.line += data[pos:]
                    if len(self.line) > MAX_LINE:
                        self._fail("bad_chunk")
                    return
                line = (bytes(self.line) + data[pos:eol]).rstrip(b"\r")
                self.line.clear()
                pos = eol + 1
                if state == SIZE:
                    try:
                        size = int(line.split(b";", 1)[0], 16)
                    except ValueError:
                        self._fail("bad_chunk")
                        return
                    if size:
                        self.cstate, self.remaining = DATA, size
                    else:
                        self.cstate = TRAILER
                elif not line:  # the empty line after the last chunk (and any trailers)
                    self._finish(now)
                    return

    def _body(self, piece: bytes, now: int) -> None:
        self.body_bytes += len(piece)
        if not self.stream:
            self.body += piece
            return
        sse = self.sse
        sse += piece
        start, scan = 0, self.scan
        stats = self.stats
        while True:
            end = sse.find(b"\n\n", scan)
            if end < 0:
                break
            stop = end + 2
            if sse.startswith(EVENT_HEAD, start):
                try:
                    stats.delays.append(now - int(sse[start + T_START : start + T_END]))
                except ValueError:
                    stats.errors["bad_event"] += 1
                if stop - start != self.size:
                    stats.errors["bad_event_size"] += 1
                self.events += 1
                if self.events == 1:
                    stats.ttfb.append(now - self.t_start)
                    stats.first_events += 1
                    if self.on_first_event is not None:
                        self.on_first_event()
            elif sse[start:stop] == DONE:
                self.saw_done = True
            elif sse[start] != 0x3A:  # ":" starts an SSE comment (a heartbeat): ignored
                stats.errors["unexpected_event"] += 1
            start = scan = stop
        if start:
            del sse[:start]
        self.scan = max(len(sse) - 1, 0)

    def _finish(self, now: int) -> None:
        stats = self.stats
        stats.bytes += self.body_bytes
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
        if self.status != 200:
            self._settle(f"http_{self.status}")
            return
        if self.stream:
            stats.events += self.events
            expected = stream_body_size(self.expected_events, self.size)
            if not self.saw_done or self.body_bytes != expected:
                self._settle("incomplete")
                return
        else:
            body = self.body
            ok = len(body) == COMPLETION_SIZE and body.startswith(COMPLETION_HEAD)
            if not ok:
                self._settle("bad_body")
                return
            stats.delays.append(now - int(body[len(COMPLETION_HEAD) : len(COMPLETION_HEAD) + 19]))
            stats.events += 1
            stats.latency.append(now - self.t_start)
        stats.responses_ok += 1
        self._settle(None)

    def _fail(self, kind: str) -> None:
        if self.done is not None and not self.done.done() and self.stream:
            self.stats.events += self.events
            self.stats.bytes += self.body_bytes
        self._settle(kind)
        if self.transport is not None:
            self.transport.close()

    def _settle(self, error: str | None) -> None:
        if self.head_seen is not None and not self.head_seen.done():
            self.head_seen.set_result(None)
        if self.done is not None and not self.done.done():
            if error is not None:
                self.stats.errors[error] += 1
            self.done.set_result(error)

    def abort(self) -> None:
        """Give up on the exchange (the scenario's deadline passed)."""
        self._fail("timeout")


class Client:
    """Runs one :class:`Spec` against ``host:port`` + ``path``."""

    def __init__(self, spec: Spec, host: str, port: int, path: str, token: bool) -> None:
        self.spec = spec
        self.host = host
        self.port = port
        self.stats = Stats()
        self.conns: list[Conn] = []
        body = {
            "model": "bench",
            "stream": spec.mode == "stream",
            "messages": [{"role": "user", "content": "hi"}],
            "bench": {"events": spec.events, "interval_ms": spec.interval_ms, "size": spec.size},
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        if spec.mode == "stream":
            head.append("Accept: text/event-stream")
        if token:  # direct: the client stands in for the proxy's credential injection
            head.append(f"{TOKEN_HEADER}: {TOKEN}")
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: Conn(self.stats, self._first_event), self.host, self.port
        )
        self.conns.append(conn)
        return conn

    def _first_event(self) -> None:
        stats = self.stats
        if stats.first_events == self.spec.streams and stats.open_at is None:
            stats.open_at = time.monotonic()
            if self.spec.signal_open:
                print("OPEN", flush=True)

    async def one_stream(self, ramp: asyncio.Semaphore) -> None:
        async with ramp:
            t_start = time.time_ns()
            try:
                conn = await self.connect()
            except OSError:
                self.stats.errors["connect"] += 1
                return
            done = conn.send(self.request, True, self.spec.size, t_start)
            conn.expected_events = self.spec.events
            assert conn.head_seen is not None
            await conn.head_seen
        await done
        if conn.transport is not None:
            conn.transport.close()

    async def request_worker(self, remaining: list[int]) -> None:
        conn: Conn | None = None
        while remaining[0] > 0:
            remaining[0] -= 1
            if conn is None or conn.closed:
                try:
                    conn = await self.connect()
                except OSError:
                    self.stats.errors["connect"] += 1
                    continue
            error = await conn.send(self.request, False, 0, time.time_ns())
            if error is not None or not conn.keep_alive:
                if conn.transport is not None:
                    conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    async def run(self) -> dict[str, object]:
        spec = self.spec
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)  # leave out start-up and imports
        started = time.monotonic()
        try:
            async with asyncio.timeout(spec.deadline_s):
                if spec.mode == "stream":
                    ramp = asyncio.Semaphore(spec.ramp)
                    await asyncio.gather(*(self.one_stream(ramp) for _ in range(spec.streams)))
                else:
                    remaining = [spec.requests]
                    workers = min(spec.concurrency, spec.requests)
                    await asyncio.gather(*(self.request_worker(remaining) for _ in range(workers)))
        except TimeoutError:
            self.stats.errors["deadline"] += 1
            for conn in self.conns:
                conn.abort()
        wall = time.monotonic() - started
        return self.summary(wall, started)

    def summary(self, wall: float, started: float) -> dict[str, object]:
        spec, stats = self.spec, self.stats
        if spec.mode == "stream":
            expected_events = spec.streams * spec.events
            expected_bytes = spec.streams * stream_body_size(spec.events, spec.size)
            units = spec.streams
        else:
            expected_events = spec.requests
            expected_bytes = spec.requests * COMPLETION_SIZE
            units = spec.requests
        usage, usage0 = resource.getrusage(resource.RUSAGE_SELF), self.usage0
        cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
        return {
            "expected_events": expected_events,
            "events": stats.events,
            "expected_bytes": expected_bytes,
            "bytes": stats.bytes,
            "expected_responses": units,
            "responses_ok": stats.responses_ok,
            "complete": stats.bytes == expected_bytes and stats.responses_ok == units,
            "errors": dict(stats.errors),
            "error_total": sum(stats.errors.values()),
            "delay_ms": quantiles_ms(stats.delays),
            "delay_cdf_ms": cdf_ms(stats.delays),
            "ttfb_ms": quantiles_ms(stats.ttfb),
            "latency_ms": quantiles_ms(stats.latency),
            "wall_s": wall,
            "events_per_s": stats.events / wall if wall else 0.0,
            "mb_per_s": stats.bytes / wall / 1e6 if wall else 0.0,
            "open_after_s": None if stats.open_at is None else stats.open_at - started,
            "client_cpu_s": cpu,
            "client_max_rss_kb": usage.ru_maxrss,
        }


def _rank(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def quantiles_ms(values: list[int]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean of nanosecond values, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    out = {f"p{int(q * 100)}": _rank(ordered, q) / 1e6 for q in (0.5, 0.9, 0.99)}
    out["max"] = ordered[-1] / 1e6
    out["mean"] = sum(ordered) / len(ordered) / 1e6
    out["n"] = len(ordered)
    return out


def cdf_ms(values: list[int], points: int = 200) -> list[float]:
    """The delay distribution as ``points`` + 1 evenly spaced quantiles, for the chart."""
    if not values:
        return []
    ordered = sorted(values)
    return [_rank(ordered, i / points) / 1e6 if i else ordered[0] / 1e6 for i in range(points + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--token", action="store_true", help="send the upstream's token itself")
    parser.add_argument("--spec", required=True, help="the scenario as JSON (see Spec)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the load client talks to loopback only")
    raise_nofile()
    install_uvloop()
    spec = Spec(**json.loads(args.spec))
    client = Client(spec, args.host, args.port, args.path, args.token)
    result = asyncio.run(client.run())
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
