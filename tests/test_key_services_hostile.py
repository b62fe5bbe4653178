"""The metadata and pod identity clients against services that misbehave: answers split into
tiny chunks, oversized or malformed answers, unusable session tokens, keys that are not one
line, a service that stalls. Every failure is a FetchFailed with a reason that quotes nothing
the service sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.credentials import key_services
from gateway.credentials.key_services import MetadataService, PodIdentityService
from gateway.credentials.token_cache import FetchFailed
from gateway.testing import serve_on_loopback

GOOD = {
    "credential": {
        "access": "TEMPAK0123456789ABCD",
        "secret": "temporary-secret-never-shown",
        "securitytoken": "security-token-never-shown",
        "expires_at": "2099-01-01T00:00:00.000000Z",
    }
}


def with_field(**fields: str) -> bytes:
    return json.dumps({"credential": {**GOOD["credential"], **fields}}).encode()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler, Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(put: Handler, get: Handler) -> str:
        app = web.Application()
        app.router.add_put("/meta-data/latest/api/token", put)
        app.router.add_get("/openstack/latest/securitykey", get)
        app.router.add_post("/pod", get)
        runner, url = await serve_on_loopback(app)
        runners.append(runner)
        return url

    yield start
    for runner in runners:
        await runner.cleanup()


async def no_tokens(request: web.Request) -> web.Response:
    return web.Response(status=404)


def answer(body: bytes, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    return handler


async def fetch(url: str) -> key_services.TemporaryKeys:
    async with aiohttp.ClientSession() as session:
        return await MetadataService(URL(url), session).fetch()


def assert_quiet(reason: str) -> None:
    for secret in ("temporary-secret-never-shown", "security-token-never-shown", "SESSION"):
        assert secret not in reason


async def test_an_answer_in_tiny_chunks_is_read_whole(serve: Callable[..., Awaitable[str]]) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i : i + 7])
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    body = json.dumps(GOOD).encode()
    keys = await fetch(await serve(no_tokens, trickle))
    assert keys.value == "TEMPAK0123456789ABCD"
    assert keys.secret.reveal() == "temporary-secret-never-shown"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x" * (key_services.MAX_ANSWER + 1), "oversized body"),
        (b"<html>not json</html>", "not JSON"),
        (b"[1, 2]", "without a credential object"),
        (json.dumps({"credential": {**GOOD["credential"], "secret": ""}}).encode(), "secret"),
        (json.dumps({"credential": {**GOOD["credential"], "expires_at": "soon"}}).encode(), "time"),
        (
            json.dumps(
                {"credential": {**GOOD["credential"], "access": "AK\r\nX-Evil: 1"}}
            ).encode(),
            "not one line",
        ),
        (
            json.dumps({"credential": {**GOOD["credential"], "securitytoken": "t\nx"}}).encode(),
            "not one line",
        ),
    ],
)
async def test_malformed_answers_are_failures_that_quote_nothing(
    serve: Callable[..., Awaitable[str]], body: bytes, reason: str
) -> None:
    with pytest.raises(FetchFailed) as caught:
        await fetch(await serve(no_tokens, answer(body)))
    assert reason in caught.value.reason
    assert_quiet(caught.value.reason)


@pytest.mark.parametrize("token", [b"", b"SESSION\r\nX-Evil: 1"])
async def test_an_unusable_session_token_is_a_failure(
    serve: Callable[..., Awaitable[str]], token: bytes
) -> None:
    async def put(request: web.Request) -> web.Response:
        return web.Response(body=token)

    with pytest.raises(FetchFailed) as caught:
        await fetch(await serve(put, answer(json.dumps(GOOD).encode())))
    assert "unusable session token" in caught.value.reason
    assert_quiet(caught.value.reason)


async def test_an_error_answer_is_not_quoted(serve: Callable[..., Awaitable[str]]) -> None:
    body = json.dumps(GOOD).encode()  # an error page that (somehow) holds the keys
    with pytest.raises(FetchFailed) as caught:
        await fetch(await serve(no_tokens, answer(body, status=500)))
    assert caught.value.reason == "the metadata service answered HTTP 500 for securitykey"


async def test_a_stalled_service_is_a_timeout_failure(
    serve: Callable[..., Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    monkeypatch.setattr(key_services, "METADATA_TIMEOUT", aiohttp.ClientTimeout(total=0.3))
    with pytest.raises(FetchFailed, match="did not answer in time"):
        await fetch(await serve(no_tokens, stall))


async def test_pod_identity_error_bodies_are_not_quoted(
    serve: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("the-pod-token")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=403, text=f"bad {request.headers['Authorization']}")

    url = await serve(no_tokens, echo)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchFailed) as caught:
            await PodIdentityService(URL(url + "/pod"), token, session).fetch()
    assert "HTTP 403" in caught.value.reason
    assert "the-pod-token" not in caught.value.reason


@pytest.mark.parametrize(("content", "reason"), [("", "is empty"), ("a\x00b", "one line")])
async def test_pod_identity_token_files_that_hold_no_token(
    serve: Callable[..., Awaitable[str]], tmp_path: Path, content: str, reason: str
) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    url = await serve(no_tokens, answer(json.dumps(GOOD).encode()))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchFailed, match=reason):
            await PodIdentityService(URL(url + "/pod"), token, session).fetch()


@pytest.mark.parametrize(
    "text",
    ["2026-12-03T10:00:00", "2026-12-03T10:00:00.000000", "2026-12-03T10:00:00.000000Z"],
)
def test_an_expires_at_without_a_zone_is_utc_whatever_the_machines_zone(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read as local time (the SDK's time.mktime), a node west of UTC would put the expiry
    hours late and sign with dead keys. The gateway takes it as UTC."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        assert key_services.parse_expiry(text, "ecs_metadata") == 1796292000.0
    finally:
        monkeypatch.undo()
        time.tzset()
