"""Logging: stderr, text or JSON, every line tagged with the request id.

Nothing here logs a header value or a body; callers pass only names, numbers and fixed text.

The access log is the one line written per request, so it does not go through ``logging``'s
record, filter and formatter machinery (a LogRecord, ``time.strftime`` and a format per line)
once :func:`setup_logging` has installed the gateway's handler: :func:`access` formats the line
itself, exactly as the formatters would, with the time text cached per second, and the lines of
one event-loop pass go out in one ``write`` at its end (before any other log line). Anywhere
else (a test's log capture, a replaced handler) the line goes through ``logging`` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import operator
import sys
import time
from collections.abc import Callable
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

ACCESS = logging.getLogger("gateway.access")
# The access-log fields, in order.
ACCESS_FIELDS = (
    "request_id",
    "key",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes",
    "end",
    "prompt_tokens",
    "completion_tokens",
    "upstream_request_id",  # only when an APIG error was re-shaped
)
# The fields of nearly every line, in order: all but the optional last one.
STANDARD_FIELDS = ACCESS_FIELDS[:-1]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if record.name.startswith("aiohttp") and record.exc_info:
            # aiohttp's parse errors quote the raw request (headers included): keep the type only
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if access is not None:
            # the request id is already in the line's prefix
            record.msg = " ".join(f"{k}={access[k]}" for k in ACCESS_FIELDS[1:] if k in access)
            record.args = None
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
        }
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _Clock:
    """Wall-clock text for log lines, formatted once a second rather than once a line."""

    __slots__ = ("_convert", "_format", "_second", "_text")

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self._format = fmt
        self._convert = convert
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        """``now`` as the formatters write it: the second's text, then milliseconds."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self._format, self._convert(second))
        return self._text


class _GatewayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler of :func:`setup_logging`; it also writes access lines directly."""

    def __init__(self, fmt: str) -> None:
        super().__init__(sys.stderr)
        self.json = fmt == "json"
        # logging.Formatter's asctime: local time, "%Y-%m-%d %H:%M:%S" then ",%03d" ms;
        # JsonFormatter's: UTC, "T", then ".%03dZ"
        self.clock = (
            _Clock("%Y-%m-%dT%H:%M:%S", time.gmtime)
            if self.json
            else _Clock("%Y-%m-%d %H:%M:%S", time.localtime)
        )
        self.text = _AccessText()
        # the text line of the standard fields, as _AccessText makes it for that set
        self._standard = (
            "%s,%03d INFO gateway.access [%s] "
            + " ".join(f"{k}=%s" for k in STANDARD_FIELDS[1:])
            + "\n"
        )
        self._pending: list[str] = []  # access lines of this event-loop pass, not yet written

    def write_access(self, line: str) -> None:
        """Queue ``line``: the access lines of one event-loop pass go out together in one
        write when it ends (one syscall for many requests under load), and before any other
        line is logged, so the order of lines stays the order of events."""
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush_access)
            except RuntimeError:  # no event loop (a tool, a test): at once
                self.flush_access()

    def flush_access(self) -> None:
        """Write the queued access lines (one write)."""
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        with self.lock or contextlib.nullcontext():
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone: nothing could be logged anyway
                pass

    def emit(self, record: logging.LogRecord) -> None:
        self.flush_access()  # earlier access lines first
        super().emit(record)

    def flush(self) -> None:
        self.flush_access()
        super().flush()

    def standard_line(self, values: tuple[Any, ...]) -> str:
        """:meth:`access_line` of the standard fields given as values, in their order (text
        format only): no dict to build, look up and take apart again per line."""
        now = time.time()
        out: str = self._standard % (self.clock(now), int((now - int(now)) * 1000), *values)
        return out

    def access_line(self, fields: dict[str, Any]) -> str:
        """The line the handler's formatter would make of an access record with ``fields``."""
        now = time.time()
        ms = int((now - int(now)) * 1000)
        rid = fields.get("request_id", "-")
        if self.json:
            entry = {
                "time": f"{self.clock(now)}.{ms:03d}Z",
                "level": "info",
                "logger": "gateway.access",
                "request_id": rid,
            }
            entry.update(fields)
            return json.dumps(entry) + "\n"
        return self.text.line(self.clock(now), ms, rid, fields)


class _AccessText:
    """``" ".join(f"{k}={fields[k]}" for k in ACCESS_FIELDS[1:] if k in fields)`` as one ``%``
    format of the fields taken at once (a quarter of the join's cost), one format per set of
    fields given: the gateway's calls give one of a few sets (optional fields come and go)."""

    __slots__ = ("_made",)

    def __init__(self) -> None:
        # per set of fields: the text's template, the whole line's, and the values' taker
        self._made: dict[tuple[str, ...], tuple[str, str, Callable[[dict[str, Any]], Any]]] = {}

    def _templates(
        self, fields: dict[str, Any]
    ) -> tuple[str, str, Callable[[dict[str, Any]], Any]]:
        given = tuple(fields)
        made = self._made.get(given)
        if made is None:
            names = [k for k in ACCESS_FIELDS[1:] if k in fields]
            if len(self._made) > 64:  # callers outside the gateway's own: stay bounded
                self._made.clear()
            text = " ".join(f"{k}=%s" for k in names)
            line = "%s,%03d INFO gateway.access [%s] " + text + "\n"  # names hold no "%"
            made = self._made[given] = (text, line, _taker(names))
        return made

    def __call__(self, fields: dict[str, Any]) -> str:
        text, _, take = self._templates(fields)
        out: str = text % take(fields)
        return out

    def line(self, clock: str, ms: int, rid: object, fields: dict[str, Any]) -> str:
        """The whole text line: ``{clock},{ms:03d} INFO gateway.access [{rid}] {text}\\n``
        in one ``%`` format."""
        _, line, take = self._templates(fields)
        out: str = line % (clock, ms, rid, *take(fields))
        return out


def _taker(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The values of ``names`` as one tuple (``itemgetter`` of one name gives no tuple)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda fields: tuple(fields[name] for name in names)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, at start-up (never on import)."""
    handler = _GatewayHandler(fmt)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # No line shows a source file, thread or process: skip computing them on every record
    # (the logging HOWTO's "Optimization" section), which matters on the per-request path.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours; its parse-error messages can quote raw
    # request bytes, so only its warnings and errors are kept.
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.server").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.web").setLevel(max(logging.WARNING, root.level))


def access(**fields: Any) -> None:
    """One access-log line; fields are names and numbers only, never header values or bodies."""
    access_fields(fields)


def access_fields(fields: dict[str, Any]) -> None:
    """:func:`access` with the fields as a dict of the caller's (not copied again)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    handler = _own_handler()
    if handler is not None:
        try:
            line = handler.access_line(fields)
        except Exception:  # a field it cannot format: logging's own handleError reports it
            pass
        else:
            handler.write_access(line)
            return
    ACCESS.info("access", extra={"access": fields, "request_id": fields.get("request_id", "-")})


def access_standard(values: tuple[Any, ...]) -> None:
    """:func:`access` with the :data:`STANDARD_FIELDS`' values, in their order: the call of
    every request (its text line formatted straight from the values)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    handler = _own_handler()
    if handler is not None and not handler.json:
        try:
            line = handler.standard_line(values)
        except Exception:  # as access_fields: through logging, which reports it
            pass
        else:
            handler.write_access(line)
            return
    access_fields(dict(zip(STANDARD_FIELDS, values, strict=True)))


def _own_handler() -> _GatewayHandler | None:
    """The gateway's handler when it alone would take an access record as is (no other handler,
    filter or level in the way), else None: then the line goes through ``logging``."""
    handlers = logging.root.handlers
    if len(handlers) == 1 and not ACCESS.handlers and ACCESS.propagate:
        handler = handlers[0]
        if (
            type(handler) is _GatewayHandler
            and handler.level <= logging.INFO
            and not handler.filters[1:]
        ):
            return handler
    return None
