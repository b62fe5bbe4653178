"""Requests sent past aiohttp's router (``gateway/server/app.py``'s ``_ProxyOnly``: any method
but GET and HEAD, no ``Expect``) get the answer they got through the router and middleware:
each odd request below is sent with the shortcut on and off and the answers compared."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.server import app as app_module
from tests.conftest import GatewayFactory, open_raw, read_answer, write_raw

BODY = b'{"model":"m","messages":[]}'
REQUESTS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
    % (len(BODY), BODY),
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY),
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nExpect: other\r\nContent-Length: 2\r\n"
    b"\r\n{}",
    b"POST /v1/a%0Ab HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/%2e%2e/admin HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
    b"DELETE /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /v1/models/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST http://a/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /v1/a%0Ab HTTP/1.1\r\nHost: a\r\n\r\n",  # routed: no route matches it
]


async def _answers(make_gateway: GatewayFactory) -> list[tuple[int, Any]]:
    gw = await make_gateway()
    answers: list[tuple[int, Any]] = []
    for raw in REQUESTS:
        reader, writer = await open_raw(gw.url)
        await write_raw(writer, raw)
        answer = await read_answer(reader)
        writer.close()
        assert answer is not None, raw
        assert answer.headers.get("X-Request-Id"), raw
        body: Any = answer.body
        if answer.headers.get("Content-Type", "").startswith("application/json") and body:
            body = json.loads(body)
            if isinstance(body, dict) and "error" in body:
                body = body["error"]["code"]
            elif isinstance(body, dict):
                body = sorted(body)  # the fake upstream's answer: ids and times differ
        answers.append((answer.status, body))
    await gw.runner.cleanup()
    return answers


async def test_requests_past_the_router_get_the_answers_they_get_through_it(
    make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = await _answers(make_gateway)
    calls: list[str] = []
    real = app_module._ProxyOnly.wants

    def never(request: Any) -> bool:
        calls.append(request.method)
        assert real(request) in (True, False)
        return False

    monkeypatch.setattr(app_module._ProxyOnly, "wants", staticmethod(never))
    routed = await _answers(make_gateway)
    # asked, and said no, every time ("POST *" may be refused by the parser before)
    assert len(calls) >= len(REQUESTS) - 1
    assert direct == routed
    assert {status for status, _ in direct} >= {200, 417}
