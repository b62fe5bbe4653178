"""The request body as the gateway reads and edits it: ``model`` read the way any upstream would,
edits made as byte splices, and large bodies parsed without stalling streams.

Parsers disagree on a JSON object with a repeated key (Python takes the last, others the first)
and on key case (Go's ``encoding/json`` matches ``MODEL`` to ``model``). A body the gateway
routes or allowlists by ``model`` must mean one thing to every parser, so a repeated top-level
key, or one equal to ``model`` ignoring case but not spelled ``model``, is refused (400
ambiguous_model). Bad JSON, also JSON nested too deep for the parser, is a 400 invalid_json.

The top-level object is walked member by member (each value parsed by the json module's own C
scanner), so the byte span of every value is known. The two edits the gateway makes (a model
alias's upstream name, ``stream_options.include_usage``) replace or insert exactly those bytes:
every other byte of the body goes up as the client sent it, in the same order (issue 11).

Parsing a body of megabytes takes the CPU for hundreds of milliseconds; on the event loop that
would stall every other client's stream, and in a thread it still would (the parser holds the
GIL). Bodies over ``OFF_LOOP`` bytes are parsed in a worker process, started on first need.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, NamedTuple

from gateway.errors import BadRequest

OFF_LOOP = 64 * 1024  # bodies above this are parsed in the worker process
WORKERS = 2

Outcome = tuple[str | None, str | None, str | None]  # (model, error code, error message)
Edit = tuple[int, int, bytes]  # replace body[start:end] with the bytes
ToBytes = Callable[[int], int]  # an index in the decoded text -> its byte offset in the body

_pool: ProcessPoolExecutor | None = None
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace (RFC 8259 §2)
# one C call per step of the walk: a key's opening quote, the colon, the comma or closing brace
_KEY = re.compile(r'[ \t\n\r]*"').match
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*").match
_NEXT = re.compile(r"[ \t\n\r]*([,}])").match
_FIRST = re.compile(r'[ \t\n\r]*(["}])').match
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner: (value, end), StopIteration if none
_ASK_USAGE = b'"stream_options":{"include_usage":true}'


class BodyInfo(NamedTuple):
    """What the gateway needs from a request body; plain values, so the worker can return it
    (a NamedTuple: built on every routed request, it costs a third of a frozen dataclass).

    Byte offsets are None when the body is not UTF-8 (JSON allows UTF-16/32; no client sends
    them, and a splice there is not worth the risk).
    """

    model: str | None = None
    error: tuple[str, str] | None = None  # (code, message) of the 400 a model lookup gives
    model_span: tuple[int, int] | None = None  # bytes of the top-level "model" value
    stream: bool = False  # "stream": true
    asks_usage: bool = False  # "stream_options": {"include_usage": true}
    ask_usage: Edit | None = None  # the splice that asks for usage, when it does not

    def raise_error(self) -> None:
        """Raise the body's 400, if it has one (only when its ``model`` is needed)."""
        if self.error is not None:
            raise BadRequest(self.error[1], code=self.error[0])


class _Invalid(ValueError):
    pass


def _members(text: str, i: int) -> tuple[list[tuple[str, Any, int, int]], int]:
    """The members of the JSON object starting at ``text[i] == "{"``: (key, value, value start,
    value end) in order, and the index of its closing brace; raises ValueError if malformed."""
    members: list[tuple[str, Any, int, int]] = []
    first = _FIRST(text, i + 1)
    if first is None:
        raise _Invalid
    if first.group(1) == "}":
        return members, first.end() - 1
    i = first.end()
    while True:
        key, i = scanstring(text, i, True)
        colon = _COLON(text, i)
        if colon is None:
            raise _Invalid
        start = colon.end()
        try:
            value, i = _SCAN(text, start)
        except StopIteration:
            raise _Invalid from None
        members.append((key, value, start, i))
        after = _NEXT(text, i)
        if after is None:
            raise _Invalid
        if after.group(1) == "}":
            return members, after.end() - 1
        quote = _KEY(text, after.end())
        if quote is None:
            raise _Invalid
        i = quote.end()


def inspect(body: bytes) -> BodyInfo:
    """Read ``body`` once: its model (or why it cannot be read), and where the edits would go."""
    if not body.strip():
        return BodyInfo()
    invalid = BodyInfo(error=("invalid_json", "the request body is not valid JSON"))
    # JSON's own encoding detection (RFC 8259 §8.1, BOMs and UTF-16/32) unless it is plain
    encoding = "utf-8" if body[:1] == b"{" and body[1:2] != b"\x00" else json.detect_encoding(body)
    try:
        text = body.decode(encoding, "surrogatepass")
        start = _WS.match(text).end()  # type: ignore[union-attr]
        if not text.startswith("{", start):
            json.loads(text)  # valid JSON but not an object, or invalid
            return BodyInfo(error=("invalid_json", "the request body must be a JSON object"))
        members, close = _members(text, start)
        if _WS.match(text, close + 1).end() != len(text):  # type: ignore[union-attr]
            return invalid  # "Extra data", as json.loads says
    except (ValueError, UnicodeDecodeError, RecursionError):
        return invalid
    to_bytes = _offsets(text, encoding)
    by_key = {k: (v, s, e) for k, v, s, e in members}
    if len(by_key) != len(members):
        return BodyInfo(error=("ambiguous_model", "the request body repeats a top-level key"))
    if [k for k in by_key if len(k) == 5 and k.lower() == "model"] not in ([], ["model"]):
        return BodyInfo(
            error=(
                "ambiguous_model",
                'the request body has a key that differs from "model" only in case',
            )
        )
    model: str | None = None
    error: tuple[str, str] | None = None
    model_span: tuple[int, int] | None = None
    if "model" in by_key and by_key["model"][0] is not None:
        value, s, e = by_key["model"]
        if isinstance(value, str):
            model = value
            model_span = (to_bytes(s), to_bytes(e)) if to_bytes is not None else None
        else:
            error = ("invalid_model", '"model" must be a string')
    stream = "stream" in by_key and by_key["stream"][0] is True
    asks, edit = False, None
    if stream:
        asks, edit = _usage_request(text, by_key, close, bool(members), to_bytes)
    return BodyInfo(model, error, model_span, stream, asks, edit)


def _usage_request(
    text: str,
    by_key: dict[str, tuple[Any, int, int]],
    close: int,
    has_members: bool,
    to_bytes: ToBytes | None,
) -> tuple[bool, Edit | None]:
    """(asks for usage already, the splice that makes it ask) for a streaming body."""
    if "stream_options" not in by_key:
        if to_bytes is None:
            return False, None
        at = to_bytes(close)  # before the closing brace: a member added last
        return False, (at, at, (b"," if has_members else b"") + _ASK_USAGE)
    options, s, e = by_key["stream_options"]
    if isinstance(options, dict) and options.get("include_usage") is True:
        return True, None
    if to_bytes is None:
        return False, None
    if options is None:
        return False, (to_bytes(s), to_bytes(e), b'{"include_usage":true}')
    if not isinstance(options, dict):
        return False, None  # not ours to repair: the upstream answers it
    inner, _ = _members(text, s)
    values = [(v, vs, ve) for k, v, vs, ve in inner if k == "include_usage"]
    if len(values) == 1 and (values[0][0] is False or values[0][0] is None):
        _, vs, ve = values[0]
        return False, (to_bytes(vs), to_bytes(ve), b"true")
    if values:
        # repeated inside (parsers disagree which counts), or not a boolean: a lenient upstream
        # (pydantic reads 1 or "true" as true) may well send usage the client then expects, so
        # it is left as sent and no event is hidden
        return False, None
    at = to_bytes(s) + 1  # just after its "{"
    return False, (at, at, b'"include_usage":true' + (b"," if inner else b""))


def _offsets(text: str, encoding: str) -> ToBytes | None:
    """A function from an index in ``text`` to a byte offset in the body, or None (not UTF-8)."""
    if encoding not in ("utf-8", "utf-8-sig"):
        return None
    bom = 3 if encoding == "utf-8-sig" else 0
    if text.isascii():
        return lambda i: i + bom
    return lambda i: len(text[:i].encode("utf-8", "surrogatepass")) + bom


def splice(body: bytes, edits: Iterable[Edit]) -> bytes:
    """``body`` with each (start, end, replacement) applied; the spans must not overlap."""
    out = body
    for start, end, data in sorted(edits, reverse=True):
        out = out[:start] + data + out[end:]
    return out


def model_edit(info: BodyInfo, upstream: str) -> Edit:
    """The splice that gives the body's ``model`` the value ``upstream``; 400 if it cannot."""
    if info.model_span is None:
        raise BadRequest(
            "a request for an aliased model must be UTF-8 JSON", code="unsupported_encoding"
        )
    start, end = info.model_span
    return start, end, json.dumps(upstream).encode()


def parse_model(body: bytes) -> Outcome:
    """The body's ``model`` as (model, None, None), or (None, code, message) for a 400."""
    info = inspect(body)
    if info.error is not None:
        return None, *info.error
    return info.model, None, None


async def sniff(body: bytes) -> BodyInfo:
    """:func:`inspect`, in the worker process for a large body."""
    if len(body) <= OFF_LOOP:
        return inspect(body)
    loop = asyncio.get_running_loop()
    for _ in range(2):  # a worker killed under us: start a fresh pool once
        try:
            return await loop.run_in_executor(_executor(), inspect, body)
        except BrokenProcessPool:
            shutdown()
    return BodyInfo(error=("invalid_json", "the request body could not be parsed"))


def _executor() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # spawn: a fork of a process with a running event loop and threads is unsafe
        _pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def shutdown() -> None:
    """Stop the worker processes (at app cleanup); the next large body starts them again."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
