"""The access line's fast path (issue 13): the same line the formatters make, in few writes.

``setup_logging``'s handler writes access lines itself (no LogRecord, formatter or strftime per
line); these tests hold it to the text and JSON formatters' output field by field, and check
that anything other than the gateway's own handler still gets the line through ``logging``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import log as gwlog
from gateway.log import setup_logging

FIELDS: dict[str, Any] = {
    "request_id": "rid-123",
    "key": "alice",
    "method": "POST",
    "path": "/v1/chat/completions",
    "route": "chat",
    "status": 200,
    "duration_ms": 12.3,
    "ttfb_ms": "-",
    "bytes": 4567,
    "end": "done",
}
TEXT_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


class CountingStream(io.StringIO):
    """stderr stand-in that counts write calls."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    names = ("aiohttp.access", "aiohttp.server", "aiohttp.web")
    saved_levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def installed(monkeypatch: pytest.MonkeyPatch, fmt: str, level: str = "info") -> CountingStream:
    stream = CountingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(level, fmt)
    return stream


def formatted(fields: dict[str, Any]) -> str:
    """What the installed handler's formatter makes of the access record (the slow path)."""
    handler = logging.getLogger().handlers[0]
    record = gwlog.ACCESS.makeRecord(
        "gateway.access",
        logging.INFO,
        "",
        0,
        "access",
        None,
        None,
        extra={"access": fields, "request_id": fields["request_id"]},
    )
    handler.filter(record)
    return handler.format(record)


OPTIONAL = [{}, {"upstream_request_id": "apig-req-42"}, {"key": None}]


def fields_with(extra: dict[str, Any]) -> dict[str, Any]:
    """FIELDS plus ``extra``; a None value leaves that field out."""
    fields = {**FIELDS, **extra}
    return {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize("extra", OPTIONAL)
@pytest.mark.usefixtures("restore_logging")
def test_text_access_line_is_the_formatters_line_in_one_write(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    fields = fields_with(extra)
    stream = installed(monkeypatch, "text")
    before = time.time()
    gwlog.access(**fields)
    gwlog.access(**FIELDS)  # another set of fields next: each gets its own format
    assert stream.writes == 2
    line, other = stream.getvalue().splitlines(keepends=True)
    assert line.endswith("\n")
    assert other[24:-1] == formatted(FIELDS)[24:]
    expected = formatted(fields)
    assert TEXT_STAMP.match(line) and TEXT_STAMP.match(expected)
    assert line[24:-1] == expected[24:]  # all but the time: same level, logger, id, fields
    stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    assert before - 0.002 <= stamp <= time.time() + 0.002  # local time, like asctime


@pytest.mark.parametrize("extra", OPTIONAL)
@pytest.mark.usefixtures("restore_logging")
def test_json_access_line_is_the_formatters_line_in_one_write(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    fields = fields_with(extra)
    stream = installed(monkeypatch, "json")
    gwlog.access(**fields)
    gwlog.access(**{**fields, "request_id": "rid-124"})
    assert stream.writes == 2
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    expected = json.loads(formatted(fields))
    assert list(first) == list(expected)  # same keys in the same order
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    expected.pop("time")
    assert first == expected
    assert second["request_id"] == "rid-124"


@pytest.mark.usefixtures("restore_logging")
def test_no_access_line_below_the_configured_level(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = installed(monkeypatch, "text", level="warning")
    gwlog.access(**FIELDS)
    assert stream.getvalue() == ""


@pytest.mark.usefixtures("restore_logging")
def test_access_line_goes_through_logging_when_another_handler_listens(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stream = installed(monkeypatch, "text")
    logging.getLogger().addHandler(caplog.handler)  # pytest's next to the gateway's
    gwlog.access(**FIELDS)
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert getattr(record, "access") == FIELDS  # noqa: B009 - set through `extra`
    assert stream.writes == 1 and "key=alice" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
async def test_access_lines_of_one_loop_pass_go_out_in_one_write_before_any_other_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = installed(monkeypatch, "text")
    for i in range(3):
        gwlog.access(**{**FIELDS, "request_id": f"rid-{i}"})
    assert stream.writes == 0  # queued until this pass of the loop ends
    logging.getLogger("gateway").warning("something else")  # the queued lines go first
    gwlog.access(**{**FIELDS, "request_id": "rid-3"})
    await asyncio.sleep(0)  # the end of the pass: the last line goes out
    lines = stream.getvalue().splitlines()
    assert [line.split("[", 1)[1].split("]", 1)[0] for line in lines] == [
        "rid-0",
        "rid-1",
        "rid-2",
        "-",
        "rid-3",
    ]
    assert "something else" in lines[3]
    assert stream.writes == 3  # three lines at once, the warning, the last line


@pytest.mark.usefixtures("restore_logging")
async def test_queued_access_lines_are_written_when_logging_shuts_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = installed(monkeypatch, "json")
    gwlog.access(**FIELDS)
    logging.getLogger().handlers[0].flush()  # what logging.shutdown() does at exit
    assert json.loads(stream.getvalue())["request_id"] == "rid-123"


STANDARD_VALUES = ("rid-9", "alice", "POST", "/v1/chat/completions", "chat", 200, 12.3, "-", 4567)
STANDARD_VALUES += ("done", 11, "-")


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.usefixtures("restore_logging")
def test_the_standard_fields_given_as_values_make_the_same_line_as_the_dict(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """The per-request call (values in STANDARD_FIELDS' order) against the formatters' line of
    the same fields as a dict, in text and in JSON (which takes the dict path)."""
    stream = installed(monkeypatch, fmt)
    fields = dict(zip(gwlog.STANDARD_FIELDS, STANDARD_VALUES, strict=True))
    gwlog.access_standard(STANDARD_VALUES)
    (line,) = stream.getvalue().splitlines()
    expected = formatted(fields)
    if fmt == "text":
        assert TEXT_STAMP.match(line)
        assert line[24:] == expected[24:]
    else:
        ours, theirs = json.loads(line), json.loads(expected)
        ours.pop("time"), theirs.pop("time")
        assert list(ours.items()) == list(theirs.items())


@pytest.mark.usefixtures("restore_logging")
def test_the_standard_fields_go_through_logging_when_another_handler_listens(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    installed(monkeypatch, "text")
    logging.getLogger().addHandler(caplog.handler)
    gwlog.access_standard(STANDARD_VALUES)
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert getattr(record, "access") == dict(  # noqa: B009 - set through `extra`
        zip(gwlog.STANDARD_FIELDS, STANDARD_VALUES, strict=True)
    )
