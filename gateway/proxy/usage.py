"""The tokens an answer used, read from the answer itself: a JSON body's ``usage``, or the SSE
event that carries it (with ``stream_options.include_usage``, the last data event before
``[DONE]``, whose ``choices`` is empty; OpenAI API reference, "The chat completion chunk").

A stream is watched without slowing the relay down: an upstream chunk that ends on an event
boundary and has no ``"usage"`` in its last KiB (nearly every one) costs a substring search of
that KiB and an ``endswith``; at most 4 KiB of an unfinished event are kept, a large chunk is
never copied or searched through, and only an event in which a ``usage`` object appears is
parsed. When the gateway itself asked for usage (``include_usage`` on the route, the client did
not ask), the usage-only event is cut out of what the client gets, and a short unfinished event
is held back until its end shows whether it is that event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# How an SSE event ends: a blank line, with CRLF, LF or CR line ends (HTML spec, "Parsing an
# event stream"); b"\r\n\r\n" ends with b"\n\r\n".
EVENT_ENDS = (b"\n\n", b"\r\r", b"\n\r\n")
USAGE_KEY = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()
# Where usage is looked for: the last TAIL bytes of each upstream chunk (the usage event is a
# few hundred bytes, followed at most by "data: [DONE]").
TAIL = 1024
# An unfinished event longer than this is not the usage event: it is not held back or kept.
HOLD = 4096


@dataclass(slots=True)
class Usage:
    """One request's token counts (None: the answer did not say), filled as the answer passes.

    The request's one record of usage: the access log, ``gateway_tokens_total`` and anything
    else that counts tokens when a request ends read it from ``Exchange.usage``.
    """

    prompt: int | None = None
    completion: int | None = None
    hide_event: bool = False  # the gateway asked for usage: its event is not the client's

    @property
    def known(self) -> bool:
        return self.prompt is not None or self.completion is not None

    @property
    def total(self) -> int:
        return (self.prompt or 0) + (self.completion or 0)

    def take(self, found: object) -> bool:
        """Keep the counts of a ``usage`` object (OpenAI's names, or the Responses API's);
        the last one seen wins, as with vLLM's cumulative ``continuous_usage_stats``."""
        if not isinstance(found, dict):
            return False
        prompt = _count(found, "prompt_tokens", "input_tokens")
        completion = _count(found, "completion_tokens", "output_tokens")
        if prompt is None and completion is None:
            return False
        self.prompt, self.completion = prompt, completion
        return True


# The largest count taken: an exact float (Prometheus counters are floats) and far inside
# Redis's 64-bit HINCRBY. A larger one (a broken or hostile upstream) would make the metric
# raise OverflowError after the answer, or fail the Redis call and trip on_error: it is unknown.
MAX_COUNT = 2**53


def _count(usage: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
            return value
    return None


def _usage_of(data: object) -> object:
    """The answer-level ``usage`` of a parsed completion, chunk or Responses API event."""
    if not isinstance(data, dict):
        return None
    found = data.get("usage")
    if found is None and isinstance(data.get("response"), dict):
        found = data["response"].get("usage")  # Responses API: response.completed
    return found


def from_json(body: bytes, usage: Usage) -> None:
    """Read the ``usage`` of a whole JSON answer (non-streaming) into ``usage``."""
    if USAGE_KEY not in body:
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return
    usage.take(_usage_of(data))


def from_tail(tail: bytes, usage: Usage) -> None:
    """Read the last ``usage`` object in the last bytes of a JSON answer too large to keep.

    Completions put ``usage`` last, and a ``"usage": {`` outside a string is a key; only that
    object is parsed."""
    starts = [m.end() - 1 for m in _USAGE_OBJECT.finditer(tail)]
    if starts:
        usage.take(_object_at(tail, starts[-1], len(tail)))


def _object_at(data: bytes, start: int, end: int) -> object:
    """The JSON value at ``data[start]`` (within ``data[:end]``), or None if it is not whole."""
    try:
        value, _ = _DECODER.raw_decode(data[start:end].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return value


def _last_end(data: bytes, before: int, floor: int = 0) -> int:
    """The offset just after the last event boundary ending at or before ``before`` and after
    ``floor`` (``floor`` when there is none).

    A boundary ends with LF or CR, so only those bytes are visited, found from the end with
    ``rfind`` of one byte (memrchr): a chunk inside a long event costs two scans, not a loop."""
    lf = data.rfind(b"\n", floor, before)
    cr = data.rfind(b"\r", floor, before)
    while lf >= 0 or cr >= 0:
        if lf > cr:
            j, lf = lf, -1
            if j > floor and data[j - 1] == 10:  # LF LF
                return j + 1
            if j > floor + 1 and data[j - 1] == 13 and data[j - 2] == 10:  # LF CR LF, CRLF CRLF
                return j + 1
            lf = data.rfind(b"\n", floor, j)
        else:
            j, cr = cr, -1
            if j > floor and data[j - 1] == 13:  # CR CR
                return j + 1
            cr = data.rfind(b"\r", floor, j)
    return floor


def _next_end(data: bytes, start: int, end: int) -> int:
    """The offset just after the first event boundary in ``data[start:end]`` (``end``: none)."""
    found = end
    for mark in EVENT_ENDS:
        i = data.find(mark, start, end)
        if i >= 0 and i + len(mark) < found:
            found = i + len(mark)
    return found


def event_data(event: bytes) -> object:
    """The JSON of an SSE event's ``data`` lines (joined with LF, as the spec joins them)."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if not lines:
        return None
    try:
        return json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):
        return None


class UsageTap:
    """Watches one SSE body for its usage; with ``usage.hide_event``, edits what goes out.

    The usage that counts is the stream's last (OpenAI's include_usage chunk just before
    ``[DONE]``, or vLLM's running totals with ``continuous_usage_stats``), so it is looked for
    only in the last ``TAIL`` bytes of each upstream chunk: a large chunk (S4's 64 KiB events)
    is never searched through. The relay calls :meth:`feed` only for a chunk that
    :meth:`needs` it (a test the relay inlines), and writes what it returns.
    """

    __slots__ = ("_hide", "pending", "usage")

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self._hide = usage.hide_event
        # the start of an unfinished event (up to HOLD bytes): held back from the client when
        # hiding, only remembered when counting
        self.pending = b""

    def needs(self, chunk: bytes) -> bool:
        """False for the common chunk: whole events and no ``"usage"`` near its end."""
        return (
            bool(self.pending)
            or not chunk.endswith(EVENT_ENDS)
            or chunk.find(USAGE_KEY, -TAIL) >= 0  # negative: from the end, clamped at 0
        )

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for ``chunk``: ``chunk`` itself, unless hiding."""
        if not self.pending:
            floor = len(chunk) - HOLD - 1
            if floor > 0 and chunk.rfind(b"\n", floor) < 0 and chunk.rfind(b"\r", floor) < 0:
                return chunk  # inside an event too long to be the usage event (S4's pieces)
        if self._hide:
            return self._hiding(chunk)
        self._counting(chunk)
        return chunk

    def finish(self, sent: bytes) -> bytes | None:
        """At the body's end: what is still to go out after ``sent`` (the last bytes that did),
        or None when the stream ends inside an event held back.

        Counting, ``pending`` was sent already: whether the stream ended cleanly is the relay's
        to see. Hiding, what is held goes out when it ends the stream on a boundary (the last
        line end of an event too long to keep, which came alone)."""
        pending, self.pending = self.pending, b""
        if not self._hide or not pending:
            return b""
        return pending if (sent[-3:] + pending[-3:]).endswith(EVENT_ENDS) else None

    def _counting(self, chunk: bytes) -> None:
        """Count the usage in ``chunk``; remember a short unfinished event, never copying the
        chunk (S4's reads hold a quarter of a megabyte)."""
        start = 0  # chunk[:start] ends the event carried over
        carried, self.pending = self.pending, b""
        if carried:
            # the carried event's end: the first boundary, which may begin in what was carried
            joint = carried[-2:]
            head = joint + chunk[:HOLD]
            end = _next_end(head, 0, len(head))
            if end < len(head) or head.endswith(EVENT_ENDS):
                start = max(0, end - len(joint))
                event = carried + chunk[:start]
                self._scan(event, 0, len(event))
            elif len(carried) + len(chunk) <= HOLD:
                self.pending = carried + chunk  # still unfinished, still short
                return
            else:
                start = min(len(chunk), HOLD)  # too long to be the usage event: forgotten
        size = len(chunk)
        cut = (
            size
            if chunk.endswith(EVENT_ENDS)
            else _last_end(chunk, size, max(start, size - HOLD - 1))
        )
        lo = max(start, size - TAIL)
        # an unfinished event too long to keep is looked at now or never (its usage object
        # may be whole already: the Responses API's response.completed ends with it)
        hi = cut if size - cut <= HOLD else size
        if lo < hi and chunk.find(USAGE_KEY, lo, hi) >= 0:
            self._scan(chunk, lo, hi)
        if 0 < size - cut <= HOLD:
            self.pending = chunk[cut:]  # the usage event may be this one, not whole yet

    def _hiding(self, chunk: bytes) -> bytes:
        """What goes out for ``chunk`` when the usage-only event is the gateway's: every whole
        event but that one; a short unfinished event is held back until its end."""
        carried = self.pending
        data = carried + chunk if carried else chunk
        self.pending = b""
        size = len(data)
        # data[:cut] is whole events, data[cut:] the start of an unfinished one (looked for only
        # in the last HOLD bytes: a longer one is no usage event)
        ends = data.endswith(EVENT_ENDS)
        cut = size if ends else _last_end(data, size, max(0, size - HOLD - 1))
        # "usage" is looked for in the last TAIL bytes, and in what was carried over
        lo = max(0, size - TAIL)
        if carried and data.find(USAGE_KEY, 0, len(carried) + len(USAGE_KEY) - 1) >= 0:
            lo = 0
        hit = lo < cut and data.find(USAGE_KEY, lo, cut) >= 0
        hidden = self._scan(data, lo, cut) if hit else []
        unfinished = size - cut
        if unfinished > HOLD and data.find(USAGE_KEY, max(lo, cut)) >= 0:
            self._scan(data, max(lo, cut), size)  # counted only: it goes out, now or never
        if 0 < unfinished <= HOLD:
            self.pending = data[cut:]
            size = cut  # what goes out ends here
        if not hidden:
            return data if size == len(data) else data[:size]
        keep, done = [], 0
        for start, end in hidden:
            keep.append(data[done:start])
            done = end
        keep.append(data[done:size])
        return b"".join(keep)

    def _scan(self, data: bytes, lo: int, hi: int) -> list[tuple[int, int]]:
        """Take the usage of each whole event in ``data[:hi]`` with a ``usage`` object from
        ``lo`` on; returns the spans of the usage-only events, when hiding."""
        hidden: list[tuple[int, int]] = []
        done = 0  # data[:done] is dealt with
        for match in _USAGE_OBJECT.finditer(data, lo, hi):
            if match.start() < done:
                continue  # a second "usage" in an event already parsed
            start = _last_end(data, match.start())
            done = _next_end(data, match.end(), hi)
            event = event_data(data[start:done])
            if event is None:
                # not whole here (begun in an earlier chunk, or still unfinished, and longer
                # than HOLD: the Responses API's response.completed carries the whole output):
                # each usage object is read alone, the last wins; such an event is never the
                # usage-only one, so nothing is hidden
                self.usage.take(_object_at(data, match.end() - 1, done))
                done = match.end()
            elif self.usage.take(_usage_of(event)) and self._hide and _usage_only(event):
                hidden.append((start, done))
        return hidden


def _usage_only(data: object) -> bool:
    """The chunk ``include_usage`` adds: no choices, only the usage."""
    return isinstance(data, dict) and data.get("choices") == []
