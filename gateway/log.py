"""Logging: stderr, text or JSON, every line tagged with the request id.

Nothing here logs a header value or a body; callers pass only names, numbers and fixed text.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
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


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, at start-up (never on import)."""
    handler = logging.StreamHandler(sys.stderr)
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
    ACCESS.info("access", extra={"access": fields, "request_id": fields.get("request_id", "-")})
