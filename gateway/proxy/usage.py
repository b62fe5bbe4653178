"""The tokens an answer used, read from the answer itself: a JSON body's ``usage``, or the SSE
event that carries it (with ``stream_options.include_usage``, the last data event before
``[DONE]``, whose ``choices`` is empty; OpenAI API reference, "The chat completion chunk").

A stream is watched without slowing the relay down: an upstream chunk that ends on an event
boundary and holds no ``"usage"`` (nearly every one) costs a substring search and an
``endswith``; only the bytes of an unfinished event are kept, and only an event in which a
``usage`` object appears is parsed. When the gateway itself asked for usage (``include_usage``
on the route, the client did not ask), the usage-only event is cut out of what the client gets,
and an unfinished event is held back until its end shows whether it is that event.
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
# An unfinished event longer than this is text, not a usage-only event: it is no longer held.
MAX_PENDING = 64 * 1024


@dataclass
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


def _count(usage: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
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
    if not starts:
        return
    text = tail[starts[-1] :].decode("utf-8", "replace")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return
    usage.take(value)


def _last_end(data: bytes, before: int) -> int:
    """The offset just after the last event boundary that ends at or before ``before`` (0)."""
    end = 0
    for mark in EVENT_ENDS:
        i = data.rfind(mark, 0, before)
        if i >= 0 and i + len(mark) > end:
            end = i + len(mark)
    return end


def _next_end(data: bytes, start: int) -> int:
    """The offset just after the first event boundary from ``start`` on (len(data): none)."""
    end = len(data)
    for mark in EVENT_ENDS:
        i = data.find(mark, start)
        if i >= 0 and i + len(mark) < end:
            end = i + len(mark)
    return end


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

    The relay calls :meth:`feed` only for a chunk that needs it (:meth:`needs`, which the relay
    inlines), and writes what it returns.
    """

    __slots__ = ("_hide", "pending", "usage")

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self._hide = usage.hide_event
        self.pending = b""  # the unfinished event so far (held back from the client if hiding)

    def needs(self, chunk: bytes) -> bool:
        """False for the common chunk: whole events and no ``"usage"`` in them."""
        return bool(self.pending) or not chunk.endswith(EVENT_ENDS) or chunk.find(USAGE_KEY) >= 0

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client for ``chunk``: ``chunk`` itself, unless hiding."""
        if not self.pending and chunk.endswith(EVENT_ENDS):
            # whole events with "usage" in them: parse only if it is an object (OpenAI's
            # include_usage chunks all carry "usage": null)
            complete = self._scan(chunk) if _USAGE_OBJECT.search(chunk) else chunk
            return complete if self._hide else chunk
        data = self.pending + chunk if self.pending else chunk
        cut = _last_end(data, len(data))
        self.pending = data[cut:]
        flushed = b""
        if len(self.pending) > MAX_PENDING:
            flushed, self.pending = self.pending, b""
        complete = data[:cut]
        if complete.find(USAGE_KEY) >= 0:
            complete = self._scan(complete)
        return complete + flushed if self._hide else chunk

    def _scan(self, events: bytes) -> bytes:
        """Take the usage of each whole event in ``events`` that has a ``usage`` object; returns
        ``events`` without the usage-only ones when hiding."""
        keep: list[bytes] = []
        done = 0  # events[:done] is dealt with
        for match in _USAGE_OBJECT.finditer(events):
            if match.start() < done:
                continue  # a second "usage" in an event already parsed
            start = _last_end(events, match.start())
            end = _next_end(events, match.end())
            data = event_data(events[start:end])
            if self.usage.take(_usage_of(data)) and self._hide and _usage_only(data):
                keep.append(events[done:start])
            else:
                keep.append(events[done:end])
            done = end
        if not keep:
            return events
        keep.append(events[done:])
        return b"".join(keep)


def _usage_only(data: object) -> bool:
    """The chunk ``include_usage`` adds: no choices, only the usage."""
    return isinstance(data, dict) and data.get("choices") == []
