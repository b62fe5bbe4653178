"""Small answers sent whole (``WholeResponse``) when the upstream's answer is hostile or odd.

A raw upstream answers with bytes no polite server sends: control characters, NUL, bytes that
are not UTF-8 in header values and the reason phrase, folded lines, many or long headers, a
body on a 204, ``Connection: close``. Each answer is read off a raw socket through the gateway
twice, once as the gateway sends it (``WholeResponse``) and once with aiohttp's ``web.Response``
in its place, and the two compared byte for byte with what the connection did next. Neither
may carry a header line the upstream smuggled in.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp import web
from conftest import GatewayFactory, RecordingUpstream

from gateway.proxy import exchange as exchange_module
from gateway.proxy import response as response_module
from tests.test_whole_response import _exchange, _request

KEY = "sk-whole-hostile-upstream-answers"
AUTH = b"Authorization: Bearer %s\r\nX-Request-Id: fixed-id\r\n" % KEY.encode()


def answer(head: bytes, body: bytes = b"{}", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, head, len(body), body)


HOSTILE = {
    "nul in a value": answer(b"X-A: a\x00b\r\n"),
    "control chars in a value": answer(b"X-A: a\x01b\x1b[31mc\x7fd\r\n"),
    "lone CR in a value": answer(b"X-A: a\rX-Injected: 1\r\n"),
    "lone LF ends a line": answer(b"X-A: a\nX-Own: 1\r\n"),  # two of the upstream's own
    "not utf-8 in a value": answer(b"X-A: \xff\xfe\x80\r\n"),
    "utf-8 in a value": answer(b"X-A: caf\xc3\xa9\r\n"),
    "folded line": answer(b"X-A: a\r\n X-Injected: 1\r\n"),
    "control char in the reason": answer(b"", status=b"200 O\x01K"),
    "not utf-8 in the reason": answer(b"", status=b"200 \xff\xfe"),
    "utf-8 in the reason": answer(b"", status=b"200 caf\xc3\xa9"),
    "crlf-looking reason": answer(b"", status=b"200 OK\\r\\nX-Injected: 1"),
    "many headers": answer(b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(120))),
    "a long header": answer(b"X-Long: " + b"L" * 8000 + b"\r\n"),
    "204 with a body": answer(b"", body=b"{}", status=b"204 No Content"),
    "304": b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    "connection close": answer(b"Connection: close\r\n"),
    "status 999": answer(b"", status=b"999 Odd"),
    "no reason": answer(b"", status=b"200"),
    "interim first": b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b""),
    "two content types": answer(b"Content-Type: a/b\r\nContent-Type: c/d\r\n"),
    "empty body 200": answer(b"", body=b""),
    "empty name": answer(b": v\r\n"),
    "space before colon": answer(b"X-A : v\r\n"),
}


def _config(upstream_url: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["listen"]["api_keys"] = [{"name": "team", "key": KEY}]
        config["routes"][0]["upstream"] = upstream_url

    return edit


async def _answers(make_gateway: GatewayFactory, upstream: RecordingUpstream) -> dict[str, Any]:
    gw = await make_gateway(_config(upstream.url))
    port = int(gw.url.rsplit(":", 1)[1])
    out: dict[str, Any] = {}
    for name, raw in HOSTILE.items():
        upstream.answer = raw
        for form in ("POST", "1.0", "HEAD"):
            out[f"{name} / {form}"] = await _exchange(
                port, _request(form, "/v1/x", AUTH), form == "HEAD"
            )
    await gw.runner.cleanup()
    return out


async def test_hostile_upstream_answers_are_sent_as_aiohttps_response_sends_them(
    make_gateway: GatewayFactory,
    recording: RecordingUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    whole = await _answers(make_gateway, recording)
    monkeypatch.setattr(response_module, "WholeResponse", web.Response)
    monkeypatch.setattr(exchange_module, "WholeResponse", web.Response)
    stock = await _answers(make_gateway, recording)
    for case in whole:
        assert whole[case] == stock[case], case
    for case, (data, _) in whole.items():
        head = data.split(b"\r\n\r\n", 1)[0]
        assert b"\nX-Injected" not in head and b"\rX-Injected" not in head, case


CONTROL = {
    "SOH in a value": (b"X-A: a\x01b\r\n", b"200 OK"),
    "ESC in a value": (b"X-A: \x1b[2J\r\n", b"200 OK"),
    "DEL in a value": (b"X-A: a\x7fb\r\n", b"200 OK"),
    "SOH in the reason": (b"", b"200 O\x01K"),
}


@pytest.mark.parametrize("case", sorted(CONTROL))
@pytest.mark.parametrize("kind", ["small", "stream"])
async def test_control_characters_from_the_upstream_are_a_502_not_a_dropped_connection(
    make_gateway: GatewayFactory,
    recording: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
    case: str,
    kind: str,
) -> None:
    """A header value or reason phrase with a control character (RFC 9110 §5.5 allows none but
    HTAB) is not HTTP. aiohttp 3.14's serializer refuses it: the client got no answer at all
    (the connection closed, an unhandled-exception traceback logged) while the access log said
    200; 3.13 passed it on to the client as is. Either way: a 502 in the OpenAI shape, as for a
    NUL (which the parser itself refuses), and the access line says 502."""
    caplog.set_level(logging.INFO)
    head, status = CONTROL[case]
    if kind == "stream":
        head += b"Content-Type: text/event-stream\r\n"
        recording.answer = b"HTTP/1.1 %s\r\n%sConnection: close\r\n\r\ndata: {}\n\n" % (
            status,
            head,
        )
    else:
        recording.answer = answer(head, status=status)
    gw = await make_gateway(_config(recording.url))
    port = int(gw.url.rsplit(":", 1)[1])
    data, then = await _exchange(port, _request("POST", "/v1/x", AUTH))
    assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), data
    assert b"\x01" not in data and b"\x1b" not in data and b"\x7f" not in data
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "upstream_error"
    assert then.startswith("HTTP/1.1 ")  # the client's connection is still good
    access = [r.access for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert access[0]["status"] == 502
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
