"""A seeded chaos run through the real gateway (issue 9, "What must show").

Hundreds of requests, many at once, against a raw upstream that draws a fault for each from a
seeded generator: resets and FINs at any byte (on or off an event boundary), stalls shorter and
longer than the idle timeout, a reset before any answer, a connection closed right after a
complete answer, in every framing (close-delimited, chunked, Content-Length) for SSE and JSON,
with writes split and coalesced at random. The upstream records exactly what it sent and counts
each request id it read whole (an execution); raw-socket clients record exactly what they got.

Every outcome is classified by comparing the two, and the run fails on any silent truncation (a
clean-looking end after a broken upstream), corruption (bytes that are not what was sent),
duplicate execution, a cleanly sent answer not delivered whole, or a connection left open.
``CHAOS_SEED`` and ``CHAOS_REQUESTS`` in the environment explore other runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import GatewayFactory
from faulty_upstream import RawClient, RawResponse, frame
from yarl import URL

from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud

# CHAOS_SEED=N explores another run; the suite's run is always the same one
SEED = int(os.environ.get("CHAOS_SEED", "20260903"))
REQUESTS = int(os.environ.get("CHAOS_REQUESTS", "240"))
CONCURRENCY = 48
IDLE = 1.0  # the route's idle timeout
SHORT_STALL = 0.05  # well inside IDLE: must not change the outcome
LONG_STALL = 1.6  # beyond IDLE: the gateway reports the timeout
POOL_IDLE = 0.3

FAULTS = {  # fault: weight
    "none": 30,
    "reset": 14,  # RST after `cut` body bytes
    "fin": 14,  # FIN after `cut` body bytes (a clean end only where the framing allows)
    "stall_short": 10,
    "stall_long": 5,  # silence beyond IDLE after `cut` bytes, then RST
    "reset_before_headers": 7,  # the request was read whole, then RST: it may have run
    "fin_after": 10,  # a complete answer, then FIN without Connection: close
    "client_leaves": 8,  # an endless trickle of events; the client goes after the first bytes
}
REVOKED = 0.08  # share of requests whose token the upstream refuses once (401): replayed once
APIG_401 = b'{"error_code": "APIG.0307", "error_msg": "The token must be updated."}'
TRICKLE = 0.01  # between the events of a stream the client leaves
LEAVE_BOUND = 1.0  # the upstream connection is closed this soon after the client left
_ERROR_EVENT = re.compile(rb"event: error\ndata: (\{[^\n]*\})\n\n\Z")


@dataclass
class Plan:
    """What the upstream does with one request."""

    framing: str  # close | chunked | length
    sse: bool
    body: bytes
    fault: str
    cut: int  # body bytes written before a reset, FIN or long stall
    writes: list[int]  # offsets where the body is split into separate writes
    leave_by: str = ""  # client_leaves: "fin" (close) or "reset" (RST)
    revoked: bool = False  # the first arrival gets a 401 (a token revoked): the gateway replays


@dataclass
class Done:
    """What the upstream did: the body bytes it wrote and whether it ended them cleanly."""

    sent: bytes = b""
    clean: bool = False  # the whole body, framed and ended as its framing says


def draw_plan(rng: random.Random, rid: str) -> Plan:
    framing = rng.choice(["close", "chunked", "length"])
    sse = rng.random() < 0.7
    fault = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
    if fault == "client_leaves":  # 3 s of events if nobody stops it: the gateway must
        events = [b"data: %b-%d\n\n" % (rid.encode(), j) for j in range(int(3 / TRICKLE))]
        body = b"".join(events)
        by = rng.choice(["fin", "reset"])
        return Plan(framing, True, body, fault, len(body), [len(e) for e in events], by)
    events: list[bytes] = []
    if sse:
        events = [
            b"data: %b-%d %b\n\n" % (rid.encode(), j, b"x" * rng.randrange(0, 400))
            for j in range(rng.randrange(1, 10))
        ]
        body = b"".join(events)
    else:
        size = rng.choice([rng.randrange(20, 3000), rng.randrange(70_000, 140_000)])
        body = json.dumps({"id": rid, "pad": "y" * size}).encode()
    cut = rng.randrange(0, len(body))  # strictly inside the body: a fault is never after it
    if sse and rng.random() < 0.5:  # on an event boundary: after some events, before the last
        cut = rng.choice([0, *itertools.accumulate(len(e) for e in events[:-1])])
    writes = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randrange(0, 6))))
    return Plan(framing, sse, body, fault, cut, writes, revoked=rng.random() < REVOKED)


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class ChaosUpstream:
    plans: dict[str, Plan]
    executions: Counter[str] = field(default_factory=Counter)
    gone: dict[str, float] = field(default_factory=dict)  # client_leaves: when it saw the close
    refused: set[str] = field(default_factory=set)  # revoked: answered 401 once (not executed)
    done: dict[str, Done] = field(default_factory=dict)
    open: int = 0
    url: str = ""
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    async def start(self) -> ChaosUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def none_open(self) -> None:
        while self.open:
            self._closed.clear()
            await self._closed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()
        finally:
            writer.close()
            self.open -= 1
            self._closed.set()

    async def _trickle(
        self,
        rid: str,
        plan: Plan,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        done: Done,
    ) -> None:
        """One event per TRICKLE until the gateway closes the connection (its client left)."""
        start = 0
        try:
            for size in plan.writes:
                piece = plan.body[start : start + size]
                start += size
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(frame(plan.framing, piece))
                done.sent += piece
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TRICKLE):  # the pause, or the close ending it
                        if not await reader.read(1):
                            break
            else:
                return  # never closed: the whole body went out, and no clean end
        except ConnectionError:
            pass
        self.gone[rid] = asyncio.get_running_loop().time()
        writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is over."""
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().decode()
        await reader.readexactly(int(headers.get(b"content-length", "0")))
        rid = headers[b"x-request-id"]
        plan = self.plans[rid]
        if plan.revoked and rid not in self.refused:  # APIG refuses it before the service runs
            self.refused.add(rid)
            writer.write(
                b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(APIG_401), APIG_401)
            )
            await writer.drain()
            return True
        self.executions[rid] += 1
        done = self.done[rid] = Done()
        if plan.fault == "reset_before_headers":
            reset(writer)
            return False
        kind = b"text/event-stream" if plan.sse else b"application/json"
        framing = {
            "close": b"Connection: close\r\n",
            "chunked": b"Transfer-Encoding: chunked\r\n",
            "length": b"Content-Length: %d\r\n" % len(plan.body),
        }[plan.framing]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n%b\r\n" % (kind, framing))
        if plan.fault == "client_leaves":
            await self._trickle(rid, plan, reader, writer, done)
            return False
        broken = plan.fault in ("reset", "fin", "stall_long")
        end = plan.cut if broken else len(plan.body)
        points = [p for p in plan.writes if p < end] + [end]
        start = 0
        for n, point in enumerate(points):
            piece = plan.body[start:point]
            start = point
            if piece:
                writer.write(frame(plan.framing, piece))
                done.sent += piece
            await writer.drain()
            if plan.fault == "stall_short" and n == 0:
                await asyncio.sleep(SHORT_STALL)
        if plan.fault == "stall_long":
            await asyncio.sleep(LONG_STALL)
            reset(writer)
            return False
        if plan.fault == "reset":
            reset(writer)
            return False
        if plan.fault == "fin":
            # close-delimited: a FIN is the end of the body, unless an SSE body is mid-event
            done.clean = plan.framing == "close" and (
                not plan.sse or not done.sent or done.sent.endswith(b"\n\n")
            )
            writer.close()
            return False
        if plan.framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        done.clean = True
        if plan.framing == "close" or plan.fault == "fin_after":
            writer.close()
            return False
        return True


def sockets_on(ports: set[int]) -> int | None:
    """This process's TCP connections (not listeners) to or from ``ports``; None off Linux.

    Read from /proc: the inodes of our own socket descriptors, matched against the kernel's TCP
    table. Only the gateway's and the upstream's ports count: the gateway's session to the fake
    IAM may keep its own connection alive, which is not a leak.
    """
    fds = Path("/proc/self/fd")
    if not fds.exists():
        return None
    inodes = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            target = os.readlink(fds / fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path("/proc/self/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ends = {int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)}
            if inode in inodes and state != "0A" and ends & ports:  # 0A: LISTEN
                count += 1
    return count


def classify(
    plan: Plan, done: Done | None, got: RawResponse, left: float | None, gone: float | None
) -> str:
    """The outcome's class; a name starting with ``BAD`` is a broken promise."""
    if plan.fault == "client_leaves":
        if done is None or got.status != 200 or not done.sent.startswith(got.body):
            return "BAD before the client left"
        if left is None or gone is None:
            return "BAD upstream kept after the client left"
        if gone - left > LEAVE_BOUND:
            return f"BAD upstream closed {gone - left:.2f} s after the client left"
        return f"client_left_{plan.leave_by}"
    if plan.revoked and done is None:
        return f"BAD 401 not replayed ({got.status})"
    if done is None:  # the upstream never read it whole: only a refusal is right
        return "refused_unsent" if got.status >= 500 else "BAD answered unsent"
    if got.status != 200:
        if done.clean:
            return f"BAD {got.status} for a clean answer"
        error = json.loads(got.body)["error"]
        return f"refused_{error['code']}"
    if done.clean:
        if got.complete and got.body == done.sent:
            return "delivered"
        return "BAD clean answer not delivered whole"
    body = got.body
    event = _ERROR_EVENT.search(body) if plan.sse else None
    if event is not None:
        body = body[: event.start()]
    if not done.sent.startswith(body):
        return "BAD corrupted"
    if event is not None:
        if body and not body.endswith(b"\n\n"):
            return "BAD error event inside an event"
        return f"error_event_{json.loads(event.group(1))['error']['code']}"
    if got.complete:
        return "BAD silent truncation"
    return "cut"


async def test_seeded_chaos_never_truncates_corrupts_duplicates_or_leaks(
    make_gateway: GatewayFactory, cloud: FakeCloud
) -> None:
    rng = random.Random(SEED)
    rids = [f"chaos-{n:04d}" for n in range(REQUESTS)]
    plans = {rid: draw_plan(rng, rid) for rid in rids}
    upstream = await ChaosUpstream(plans).start()

    def edit(config: dict[str, Any]) -> None:
        config["routes"] = [
            {
                "name": "chaos",
                "path": "/v1",
                "upstream": upstream.url,
                "credential": "main",  # the fake IAM's token: a 401 makes it fetch a new one
                "heartbeat": 0,
                "max_concurrency": 1000,
                "timeouts": {
                    "connect": 2,
                    "first_byte": 5,
                    "idle": IDLE,
                    "total": 20,
                    "pool_idle": POOL_IDLE,
                },
            }
        ]

    try:
        gw = await make_gateway(edit)
        slots = asyncio.Semaphore(CONCURRENCY)
        loop = asyncio.get_running_loop()
        ports = {URL(gw.url).port or 0, URL(upstream.url).port or 0}
        assert sockets_on(ports) in (0, None)

        left: dict[str, float] = {}

        async def one(rid: str) -> RawResponse:
            async with slots:
                client = await RawClient.post(
                    gw.url, "/v1/chat/completions", b"{}", {"X-Request-Id": rid}
                )
                plan = plans[rid]
                if plan.fault != "client_leaves":
                    return await client.finish()
                await client.until(1)
                if plan.leave_by == "reset":
                    reset(client.writer)
                else:
                    client.writer.close()
                left[rid] = loop.time()
                return RawResponse(client.status, client.headers, bytes(client.body), False)

        start = loop.time()
        async with asyncio.timeout(40):
            answers = await asyncio.gather(*(one(rid) for rid in rids))
        elapsed = loop.time() - start

        outcomes = Counter(
            classify(plans[rid], upstream.done.get(rid), got, left.get(rid), upstream.gone.get(rid))
            for rid, got in zip(rids, answers, strict=True)
        )
        summary = dict(sorted(outcomes.items()))
        print(f"\n{REQUESTS} requests in {elapsed:.2f} s, seed {SEED}: {summary}")
        assert not [o for o in outcomes if o.startswith("BAD")], outcomes
        duplicates = {rid: n for rid, n in upstream.executions.items() if n > 1}
        assert not duplicates, duplicates
        revoked = {rid for rid in rids if plans[rid].revoked}
        assert upstream.refused == revoked and revoked  # each refused once, then replayed
        print(f"{len(revoked)} tokens refused once and replayed; IAM calls: {cloud.iam.calls}")
        # the run exercised what it claims: clean deliveries, cuts and error events, refusals
        assert outcomes["delivered"] > REQUESTS // 3
        assert outcomes["cut"] > 0 and outcomes["error_event_upstream_error"] > 0
        assert outcomes["error_event_upstream_idle_timeout"] > 0
        assert outcomes["refused_upstream_unreachable"] > 0
        assert outcomes["client_left_fin"] > 0 and outcomes["client_left_reset"] > 0
        for by in ("fin", "reset"):
            lags = sorted(upstream.gone[r] - left[r] for r in left if plans[r].leave_by == by)
            print(
                f"client {by}: upstream closed {lags[len(lags) // 2] * 1000:.1f} ms (median), "
                f"{lags[-1] * 1000:.1f} ms (max) after it left ({len(lags)} streams)"
            )

        # nothing left open: no request in flight, no stream, no active upstream connection,
        # and the idle ones closed by the pool's timer
        proxy = gw.app[GATEWAY].proxy
        assert proxy.in_flight == 0
        assert gw.metric("gateway_active_streams", route="chaos") == 0
        assert gw.metric("gateway_upstream_connections", route="chaos", state="active") == 0
        try:
            async with asyncio.timeout(POOL_IDLE + 2):
                await upstream.none_open()
        except TimeoutError:
            raise AssertionError(f"{upstream.open} upstream connections left open") from None
        assert gw.metric("gateway_upstream_connections", route="chaos", state="idle") == 0
        # and no socket of either side left in this process (the gateway's client connections
        # too, not only the upstream's)
        left_open = sockets_on(ports)
        assert left_open in (0, None), f"{left_open} sockets to the gateway or upstream left open"
    finally:
        await upstream.close()
