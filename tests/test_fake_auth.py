"""The fake ModelArts service checks each auth mode as APIG and MaaS do, error bodies included.

Requests here are signed by hand (the gateway's signing module only builds the Authorization
value); the fake verifies them with its own code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.credentials.signing import authorization
from gateway.testing import FakeModelArts, serve_on_loopback

AK, SK = "QTWAOYTTINDUT2QVKYUC", "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
APP_KEY, APP_SECRET = "0117c425f71487ea362ba84dc4abe5e1", "b1a2c3d4e5f60718293a4b5c6d7e8f90"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[FakeModelArts], Any]]:
    runners: list[web.AppRunner] = []

    async def start(fake: FakeModelArts) -> str:
        runner, url = await serve_on_loopback(fake.app)
        runners.append(runner)
        return url + fake.base_path

    yield start
    for runner in runners:
        await runner.cleanup()


def sdk_date(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def signed_headers(
    url: str,
    key: str,
    secret: str,
    *,
    when: float | None = None,
    body: bytes = BODY,
    path_suffix: str = "/v1/chat/completions",
    query: str = "",
) -> dict[str, str]:
    """Headers for a POST to ``url + path_suffix``, signed with key/secret."""
    from yarl import URL

    target = URL(url + path_suffix + (f"?{query}" if query else ""), encoded=True)
    headers = {
        "Host": target.host_port_subcomponent or "",
        "Content-Type": "application/json",
        "X-Sdk-Date": sdk_date(time.time() if when is None else when),
    }
    headers["Authorization"] = authorization(
        method="POST",
        raw_path=target.raw_path,
        raw_query=target.raw_query_string,
        headers=headers,
        body=body,
        key=key,
        secret=secret,
    )
    return headers


async def post(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: bytes = BODY,
    suffix: str = "/v1/chat/completions",
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with http.post(url + suffix, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def test_open_service_accepts_anything(serve: Any, http: aiohttp.ClientSession) -> None:
    url = await serve(FakeModelArts())
    status, body, _ = await post(http, url, {"Content-Type": "application/json"})
    assert status == 200 and body["object"] == "chat.completion"


async def test_iam_aksk_signature_is_accepted(serve: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeModelArts(aksk={AK: SK})
    url = await serve(fake)
    status, _, _ = await post(http, url, signed_headers(url, AK, SK))
    assert status == 200
    assert fake.authenticated == ["aksk"]


async def test_signature_covers_the_query(serve: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeModelArts(aksk={AK: SK})
    url = await serve(fake)
    query = "z=1&a=%E4%B8%AD&a=0&flag"
    headers = signed_headers(url, AK, SK, query=query)
    status, _, _ = await post(http, url, headers, suffix=f"/v1/chat/completions?{query}")
    assert status == 200
    status, body, _ = await post(http, url, headers, suffix="/v1/chat/completions?z=2")
    assert status == 401 and body["error_code"] == "APIG.0301"


async def test_tampered_body_fails_with_apig_0301_and_the_canonical_request(
    serve: Any, http: aiohttp.ClientSession
) -> None:
    url = await serve(FakeModelArts(aksk={AK: SK}))
    headers = signed_headers(url, AK, SK)
    status, body, resp_headers = await post(http, url, headers, body=BODY + b" ")
    assert status == 401
    assert set(body) == {"error_code", "error_msg", "request_id"}
    assert body["error_code"] == "APIG.0301"
    message = body["error_msg"]
    prefix = (
        "Incorrect IAM authentication information: verify aksk signature fail, canonicalRequest:"
    )
    assert message.startswith(prefix + "POST|/v1/infers/")
    assert message.endswith(hashlib.sha256(BODY + b" ").hexdigest())
    assert "|content-type;host;x-sdk-date|" in message
    assert resp_headers["X-Request-Id"] == body["request_id"]
    assert SK not in message


async def test_unknown_ak_fails_with_get_secret_key_failed(
    serve: Any, http: aiohttp.ClientSession
) -> None:
    url = await serve(FakeModelArts(aksk={AK: SK}))
    status, body, _ = await post(http, url, signed_headers(url, "NOSUCHAK", SK))
    assert (status, body["error_code"]) == (401, "APIG.0301")
    assert body["error_msg"] == (
        "Incorrect IAM authentication information: Get secretKey failed,ak:NOSUCHAK,"
        "err:ak not exist"
    )


@pytest.mark.parametrize("skew", [16 * 60, -16 * 60])
async def test_iam_signature_older_or_newer_than_15_minutes_expired(
    serve: Any, http: aiohttp.ClientSession, skew: float
) -> None:
    url = await serve(FakeModelArts(aksk={AK: SK}))
    headers = signed_headers(url, AK, SK, when=time.time() + skew)
    status, body, _ = await post(http, url, headers)
    assert (status, body["error_code"]) == (401, "APIG.0301")
    assert body["error_msg"] == (
        "Incorrect IAM authentication information: calc ak sk signature fail:signature expired"
    )


@pytest.mark.parametrize("skew", [14 * 60, -14 * 60])
async def test_skew_under_15_minutes_is_tolerated(
    serve: Any, http: aiohttp.ClientSession, skew: float
) -> None:
    url = await serve(FakeModelArts(aksk={AK: SK}))
    status, _, _ = await post(http, url, signed_headers(url, AK, SK, when=time.time() + skew))
    assert status == 200


async def test_app_signature_expired_names_both_times(
    serve: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeModelArts(app_aksk={APP_KEY: APP_SECRET}, clock=lambda: 1685153168.0)
    url = await serve(fake)
    headers = signed_headers(url, APP_KEY, APP_SECRET, when=1685153168.0 - 7297)
    status, body, _ = await post(http, url, headers)
    assert (status, body["error_code"]) == (401, "APIG.0303")
    # the example in APIG's FAQ "Incorrect app authentication information"
    assert body["error_msg"] == (
        "Incorrect app authentication information: signature expired, "
        "signature time:20230527T000431Z,server time:20230527T020608Z"
    )


async def test_app_signature_failures_use_apig_0303(
    serve: Any, http: aiohttp.ClientSession
) -> None:
    fake = FakeModelArts(app_aksk={APP_KEY: APP_SECRET})
    url = await serve(fake)
    status, body, _ = await post(http, url, signed_headers(url, APP_KEY, APP_SECRET))
    assert status == 200
    status, body, _ = await post(http, url, signed_headers(url, APP_KEY, "wrong"))
    assert (status, body["error_code"]) == (401, "APIG.0303")
    assert body["error_msg"].startswith(
        "Incorrect app authentication information: verify signature fail, canonicalRequest:POST|"
    )
    status, body, _ = await post(http, url, signed_headers(url, "unknown-app", APP_SECRET))
    assert body["error_msg"] == (
        "Incorrect app authentication information: app not found, appkey unknown-app"
    )


async def test_date_must_be_signed(serve: Any, http: aiohttp.ClientSession) -> None:
    url = await serve(FakeModelArts(aksk={AK: SK}))
    headers = signed_headers(url, AK, SK)
    headers["Authorization"] = headers["Authorization"].replace(
        "SignedHeaders=content-type;host;x-sdk-date", "SignedHeaders=content-type;host"
    )
    status, body, _ = await post(http, url, headers)
    assert (status, body["error_code"]) == (401, "APIG.0301")


async def test_api_keys_answer_like_maas(serve: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeModelArts(api_keys={"good-key"})
    url = await serve(fake)
    status, body, _ = await post(http, url, {"Authorization": "Bearer good-key"})
    assert status == 200
    status, body, _ = await post(http, url, {"Authorization": "Bearer bad-key"})
    assert (status, body) == (
        401,
        {"error_code": "ModelArts.81003", "error_msg": "Invalid authorization header."},
    )
    for headers in ({}, {"Authorization": "Basic Z29vZC1rZXk="}):
        status, body, _ = await post(http, url, headers)
        assert (status, body) == (
            400,
            {
                "error_code": "ModelArts.81002",
                "error_msg": "Failed to get the authorization header.",
            },
        )
    assert fake.authenticated == ["api_key"]


async def test_app_codes(serve: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeModelArts(app_codes={"code-1"})
    url = await serve(fake)
    status, _, _ = await post(http, url, {"X-Apig-AppCode": "code-1"})
    assert status == 200
    status, body, _ = await post(http, url, {"X-Apig-AppCode": "code-2"})
    assert (status, body["error_code"], body["error_msg"]) == (
        401,
        "APIG.0303",
        "Incorrect app authentication information.",
    )


async def test_token_mode_is_unchanged(serve: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeModelArts(token_checker=lambda t: t == "good")
    url = await serve(fake)
    status, body, _ = await post(http, url, {})
    assert (status, body["error_msg"]) == (
        401,
        "Incorrect IAM authentication information: x-auth-token not found",
    )
    status, body, _ = await post(http, url, {"X-Auth-Token": "bad"})
    assert (status, body["error_code"]) == (401, "APIG.0307")
    status, _, _ = await post(http, url, {"X-Auth-Token": "good"})
    assert status == 200
    # with AK/SK also configured (an IAM-auth API takes both), a signature is checked instead
    fake.aksk[AK] = SK
    status, _, _ = await post(http, url, signed_headers(url, AK, SK))
    assert status == 200
    assert fake.authenticated == ["token", "aksk"]
