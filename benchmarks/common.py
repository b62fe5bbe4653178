"""What the fake upstream, the load client and the runner agree on: the wire format of events.

An event is exactly ``size`` bytes, so the client can check byte-completeness by arithmetic::

    data: {"t":<19-digit time.time_ns() at send>,"i":<index>,"p":"xxx…"}\\n\\n

``t`` sits at a fixed offset, so the client reads it without parsing JSON. Both processes use
``time.time_ns()`` (CLOCK_REALTIME, one clock on one machine), so receive - send is the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource

TOKEN = "bench-token-not-secret"
TOKEN_HEADER = "X-Auth-Token"
# The path the upstream serves; every target must deliver requests to exactly this path.
UPSTREAM_PREFIX = "/v1/infers/bench"
CLIENT_PATH = "/v1/chat/completions"
UPSTREAM_PATH = UPSTREAM_PREFIX + CLIENT_PATH

EVENT_HEAD = b'data: {"t":'
T_DIGITS = 19  # time.time_ns() has 19 digits until the year 2286
T_START = len(EVENT_HEAD)
T_END = T_START + T_DIGITS
DONE = b"data: [DONE]\n\n"
MIN_EVENT_SIZE = 64
# Non-streaming response: ``t`` at a fixed offset too, and a fixed length.
COMPLETION_HEAD = b'{"t":'
COMPLETION_TAIL = (
    b',"id":"chatcmpl-bench","object":"chat.completion","model":"bench","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}'
)
COMPLETION_SIZE = len(COMPLETION_HEAD) + T_DIGITS + len(COMPLETION_TAIL)


def event_overhead(index: int) -> int:
    """Bytes of an event other than its padding."""
    return len(EVENT_HEAD) + T_DIGITS + len(b',"i":') + len(str(index)) + len(b',"p":""}\n\n')


def stream_body_size(events: int, size: int) -> int:
    """Bytes of a whole streamed body: ``events`` events of ``size`` bytes, then ``[DONE]``."""
    return events * size + len(DONE)


def install_uvloop() -> str:
    """Use uvloop when it is installed; returns the loop's name for the report."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {getattr(uvloop, '__version__', '?')}"


def raise_nofile(cap: int = 65536) -> int:
    """Raise the soft open-files limit towards the hard one (bounded by ``cap``); S5 needs ~2k."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    return soft
