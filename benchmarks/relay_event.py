"""CPU per event of the relay's own loop (gateway/proxy/sse.py), in process, without sockets.

S2 measures the whole gateway process, where the relay loop is a small part of ~20 µs per event
and other processes' load moves the figure by several µs. This isolates what issue 11 added to
the loop (the usage watcher): the same 200-byte S2-style events, one per upstream chunk, are
pumped through ``Relay`` to a sink that drops them, without the watcher, with it, with it
hiding (an include_usage route), and with events that carry ``"usage": null`` (OpenAI's chunks
under include_usage); then S4's shape, 64 KiB events read in 16 KiB pieces.
``--against FILE`` also times another copy of sse.py (e.g. ``git show main:gateway/proxy/sse.py``).

    python benchmarks/relay_event.py [--against /tmp/sse_main.py]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from collections import deque
from types import ModuleType
from typing import Any

from gateway.metrics import ChunkStats
from gateway.proxy import sse
from gateway.proxy.usage import Usage, UsageTap

EVENTS = 200_000
ROUNDS = 7


def s2_event(i: int, usage_null: bool = False) -> bytes:
    """An event like benchmarks/upstream.py sends: exactly 200 bytes."""
    head: dict[str, Any] = {"t": time.time_ns(), "i": i}
    if usage_null:
        head["usage"] = None
    text = json.dumps({**head, "p": ""}, separators=(",", ":"))
    pad = 200 - len(b"data: \n\n") - len(text)
    return b"data: " + text[:-2].encode() + b"x" * pad + b'"}\n\n'


class Source:
    """Every chunk already buffered: one ``_pump`` call relays them all."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = deque(chunks)

    hooked = False

    def take(self, waker: object) -> bytes:
        return self.chunks.popleft() if self.chunks else b""

    def settle(self, waker: object) -> bool | None:
        return not self.chunks

    def unhook(self, waker: object) -> None:
        pass


class Sink:
    def write(self, data: bytes) -> bool:
        return False

    async def drain(self) -> None:
        pass

    def abort(self) -> None:
        pass


def per_event(
    module: ModuleType, chunks: list[bytes], tap: bool, hide: bool = False, per: float = 1
) -> tuple[float, float]:
    """Best and median of ROUNDS, µs per event (``per`` chunks), of ``module.Relay`` pumping
    ``chunks``; ``hide``: the watcher as on an include_usage route."""

    async def once() -> float:
        kwargs: dict[str, Any] = {"tap": UsageTap(Usage(hide_event=hide))} if tap else {}
        relay = module.Relay(Source(chunks), Sink(), sse=True, stats=ChunkStats(), **kwargs)
        start = time.perf_counter()
        relay._pump()
        elapsed = time.perf_counter() - start
        relay._close()
        return elapsed * 1e6 * per / len(chunks)

    times = [asyncio.run(once()) for _ in range(ROUNDS)]
    return min(times), statistics.median(times)


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("sse_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sse_against"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", help="another sse.py to time the same way")
    args = parser.parse_args()
    plain = [s2_event(i) for i in range(EVENTS)]
    nulls = [s2_event(i, usage_null=True) for i in range(EVENTS)]
    rows = []
    if args.against:
        rows.append(("--against, no watcher", per_event(load(args.against), plain, False)))
    rows.append(("this sse.py, no watcher", per_event(sse, plain, False)))
    rows.append(("this sse.py, watcher (every SSE answer)", per_event(sse, plain, True)))
    rows.append(('watcher, every event has "usage":null', per_event(sse, nulls, True)))
    rows.append(("watcher hiding (include_usage route)", per_event(sse, plain, True, True)))
    print(f"{EVENTS:,} events of 200 B, best / median of {ROUNDS} rounds, µs per event")
    for name, (best, median) in rows:
        print(f"  {name:45s} {best:6.3f} / {median:6.3f}")
    # S4's shape: 64 KiB events, each read in four 16 KiB pieces (only the last ends on a
    # boundary); the same four objects over and over, in cache as a piece just read would be
    big = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    four = [big[k * 16384 : (k + 1) * 16384] for k in range(4)]
    pieces = four * 2000
    rows = []
    if args.against:
        rows.append(("--against, no watcher", per_event(load(args.against), pieces, False, per=4)))
    rows.append(("this sse.py, no watcher", per_event(sse, pieces, False, per=4)))
    rows.append(("this sse.py, watcher", per_event(sse, pieces, True, per=4)))
    rows.append(("watcher hiding (include_usage route)", per_event(sse, pieces, True, True, 4)))
    print("2,000 events of 64 KiB in 16 KiB pieces, µs per event")
    for name, (best, median) in rows:
        print(f"  {name:45s} {best:6.3f} / {median:6.3f}")
    # S4 as the gateway really reads it: ~250 KB reads, each across four event boundaries
    stream = big * 125  # 8 MB, cut into 32 reads that end anywhere; the cycle repeats
    reads = [stream[i : i + 256_000] for i in range(0, len(stream), 256_000)]
    events = 125 * 40
    cycle = reads * 40
    per = len(cycle) / events
    rows = []
    if args.against:
        rows.append(("--against, no watcher", per_event(load(args.against), cycle, False, per=per)))
    rows.append(("this sse.py, no watcher", per_event(sse, cycle, False, per=per)))
    rows.append(("this sse.py, watcher", per_event(sse, cycle, True, per=per)))
    rows.append(("watcher hiding (include_usage route)", per_event(sse, cycle, True, True, per)))
    print(f"{events:,} events of 64 KiB in reads of 256 kB, µs per event")
    for name, (best, median) in rows:
        print(f"  {name:45s} {best:6.3f} / {median:6.3f}")


if __name__ == "__main__":
    main()
