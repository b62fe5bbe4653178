"""No token, password or client key in any log line, error body or exception message."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, RunningGateway, chat_body, raw_until_closed
from multidict import CIMultiDict
from yarl import URL

from gateway.config.load import parse_settings
from gateway.config.model import Secret
from gateway.credentials import Outgoing
from gateway.credentials.static import StaticToken
from gateway.log import setup_logging
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud

PASSWORD = "Pa55-Secret-Fake-IAM-9f3c"
WRONG_PASSWORD = "Wr0ng-Secret-Guess-7d1e"
STATIC_TOKEN = "MIIstatic-Secret-Token-5b2a"
CLIENT_KEY = "sk-client-secret-XYZ"
CLIENT_AUTH = f"Bearer {CLIENT_KEY}"
CHAT = "/v1/chat/completions"
AIOHTTP_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client")


@contextmanager
def gateway_logging() -> Iterator[None]:
    """Everything at DEBUG, also through the gateway's own text and JSON handlers (to stderr).

    ``setup_logging`` replaces the root handlers (pytest's capture included), so its handlers are
    taken out and added next to pytest's. Entered inside the test: capsys swaps ``sys.stderr``
    between the setup and call phases.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in AIOHTTP_LOGGERS}
    setup_logging("debug", "json")
    json_handler = root.handlers[0]
    setup_logging("debug", "text")
    text_handler = root.handlers[0]
    root.handlers[:] = saved_handlers
    for handler in (json_handler, text_handler):
        root.addHandler(handler)
    for name in AIOHTTP_LOGGERS:  # hear even what setup_logging quietens
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for handler in (json_handler, text_handler):
            root.removeHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Transcript:
    """What a client could see: statuses, headers and bodies of every response."""

    seen: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def call(
        self, http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
    ) -> tuple[int, bytes]:
        headers = {"Authorization": CLIENT_AUTH, **kwargs.pop("headers", {})}
        async with http.request(method, url, headers=headers, **kwargs) as resp:
            body = await resp.read()
            self.seen.append(f"{resp.status} {dict(resp.headers)!r}")
            self.seen.append(body.decode("utf-8", "replace"))
            self.statuses.append(resp.status)
            return resp.status, body


def record_texts(records: list[logging.LogRecord]) -> Iterator[str]:
    """Every way a record could show a value: message, raw args, extras, exception text."""
    plain = logging.Formatter()
    for record in records:
        yield record.getMessage()
        yield repr(record.args)
        yield repr(getattr(record, "access", None))
        if record.exc_info:
            yield plain.formatException(record.exc_info)
        if record.exc_text:
            yield record.exc_text


async def test_a_whole_session_leaks_no_secret(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    with gateway_logging():
        await run_session(cloud, make_gateway, http, caplog, capsys)


async def run_session(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cloud.iam.password = PASSWORD

    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["fixed"] = {"type": "token", "token": STATIC_TOKEN}
        config["routes"].append(
            {**config["routes"][0], "name": "static", "path": "/v1/sse", "credential": "fixed"}
        )

    gw = await make_gateway(edit)
    t = Transcript()
    url = gw.url + CHAT

    # stream and non-stream
    assert (await t.call(http, "POST", url, json=chat_body()))[0] == 200
    assert (await t.call(http, "POST", url, json=chat_body(stream=False)))[0] == 200
    # upstream 401 after a revoked token: refreshed and replayed
    cloud.iam.revoke_all()
    assert (await t.call(http, "POST", url, json=chat_body(stream=False)))[0] == 200
    assert cloud.modelarts.unauthorized == 1
    # IAM failing while a fresh token is needed: 502
    cloud.iam.failures = [500]
    cloud.iam.revoke_all()
    assert (await t.call(http, "POST", url, json=chat_body()))[0] == 502
    # a static token the upstream refuses: 502, and the client's own X-Auth-Token not forwarded
    static = await t.call(
        http, "POST", gw.url + "/v1/sse", json={}, headers={"X-Auth-Token": CLIENT_KEY}
    )
    assert static[0] == 502
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == STATIC_TOKEN
    # client errors carrying the client's key
    assert (await t.call(http, "POST", gw.url + "/nowhere", json=chat_body()))[0] == 404
    assert (await t.call(http, "GET", gw.url + "/v1/../x"))[0] in (400, 404)

    # wrong password
    wrong = await make_gateway(lambda c: c["credentials"]["main"].update(password=WRONG_PASSWORD))
    for _ in range(2):
        assert (await t.call(http, "POST", wrong.url + CHAT, json=chat_body()))[0] == 502

    # every token IAM issued reached the fake at least once
    tokens = {r.headers["X-Auth-Token"] for r in cloud.modelarts.requests}
    tokens.discard("")
    cache_token = gw.app[GATEWAY].credentials["main"].cache.token  # type: ignore[attr-defined]
    if cache_token is not None:
        tokens.add(cache_token.value)
    assert len(tokens) == 3  # the first, the one after the revoke, and STATIC_TOKEN
    secrets = {*tokens, STATIC_TOKEN, PASSWORD, WRONG_PASSWORD, CLIENT_KEY}

    stderr = capsys.readouterr().err
    assert "status=200" in stderr  # the text formatter's access lines were written...
    assert '"status": 200' in stderr, stderr[:3000]  # ...and the JSON formatter's
    assert caplog.records
    places = {
        "stderr (gateway text and JSON formatters)": stderr,
        "caplog": caplog.text,
        "log records": "\n".join(record_texts(caplog.records)),
        "responses": "\n".join(t.seen),
    }
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) leaked into {where}"


async def test_errors_and_reprs_do_not_show_the_token(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway.url + CHAT, json=chat_body(stream=False)) as resp:
        assert resp.status == 200
    credential = gateway.app[GATEWAY].credentials["main"]
    token = credential.cache.token  # type: ignore[attr-defined]
    assert token is not None
    assert token.value not in repr(token)
    assert token.value not in str(token)

    outgoing = Outgoing("POST", URL("http://upstream/x"), CIMultiDict(), b"{}")
    await credential.apply(outgoing)
    assert outgoing.headers["X-Auth-Token"] == token.value
    assert token.value not in repr(outgoing)

    static = StaticToken("fixed", Secret(STATIC_TOKEN))
    outgoing = Outgoing("POST", URL("http://upstream/x"), CIMultiDict(), b"{}")
    await static.apply(outgoing)
    assert STATIC_TOKEN not in repr(outgoing)


def test_settings_repr_hides_secrets() -> None:
    raw = {
        "credentials": {
            "main": {
                "type": "iam_password",
                "iam_url": "https://iam.example.com",
                "domain": "d",
                "user": "u",
                "password": "${PW}",
                "project": "cn-southwest-2",
            },
            "fixed": {"type": "token", "token": STATIC_TOKEN},
        },
        "routes": [
            {"name": "a", "path": "/v1", "upstream": "https://x.example.com", "credential": "main"}
        ],
    }
    settings = parse_settings(raw, {"PW": PASSWORD})
    for text in (repr(settings), str(settings), f"{settings}", repr(settings.credentials)):
        assert PASSWORD not in text
        assert STATIC_TOKEN not in text


def test_secret_shows_only_stars() -> None:
    secret = Secret("x")
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert "x" not in repr(secret).replace("Secret", "")
    assert secret.reveal() == "x"


@pytest.mark.parametrize(
    "bad_line",
    [
        f"Authorization: {CLIENT_AUTH}\x01".encode(),
        f"Authorization {CLIENT_AUTH}".encode(),
        f"X-Pad: {'a' * 9000} {CLIENT_AUTH}".encode(),
    ],
    ids=["control-char", "no-colon", "too-long"],
)
async def test_malformed_request_is_not_quoted_in_gateway_logs(
    gateway: RunningGateway,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    bad_line: bytes,
) -> None:
    """aiohttp's parse errors quote the raw request; the gateway's handlers must drop that."""
    caplog.set_level(logging.DEBUG)
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + bad_line + b"\r\n\r\n"
    with gateway_logging():
        answer = await raw_until_closed(gateway.url, request)
    assert answer.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")) or answer == b""
    stderr = capsys.readouterr().err
    assert any(r.name.startswith("aiohttp") for r in caplog.records), "nothing was logged"
    assert "Error handling request" in stderr  # aiohttp's record went through our handlers...
    assert CLIENT_KEY not in stderr  # ...without the raw request it quotes
