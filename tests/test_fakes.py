"""The fakes answer like the real services, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from conftest import chat_body

from gateway.testing import (
    SSE_CONTENT_TYPE,
    FakeCloud,
    FakeIAM,
    FakeModelArts,
    serve_on_loopback,
)
from gateway.testing.iam import IAM_WRONG_PASSWORD


def password_body(
    *,
    user: str = "demo-user",
    password: str = "demo-password",
    domain: str = "demo-account",
    project: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "password": password, "domain": {"name": domain}}
                },
            },
            "scope": {"project": project if project is not None else {"name": "cn-southwest-2"}},
        }
    }


def sse_payloads(raw: bytes) -> list[str]:
    """The data of each event, from a complete SSE body."""
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


async def get_token(cloud: FakeCloud, http: aiohttp.ClientSession) -> str:
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=password_body()) as resp:
        assert resp.status == 201
        return resp.headers["X-Subject-Token"]


# --- IAM ------------------------------------------------------------------------------------


async def test_password_token_returns_201_with_subject_token_and_expiry(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=password_body()) as resp:
        assert resp.status == 201
        token = resp.headers["X-Subject-Token"]
        body = await resp.json()
    assert token.startswith("MII") and len(token) > 1000
    assert cloud.iam.is_valid(token)
    expires_at = body["token"]["expires_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", expires_at)
    expires = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    assert abs(expires - (time.time() + 86400)) < 5
    assert body["token"]["methods"] == ["password"]
    assert body["token"]["project"]["name"] == "cn-southwest-2"
    assert body["token"]["user"]["name"] == "demo-user"
    user = cloud.iam.requests[0]["auth"]["identity"]["password"]["user"]
    assert user["password"] == "***" and user["name"] == "demo-user"


async def test_each_token_request_gets_a_new_token(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    assert await get_token(cloud, http) != await get_token(cloud, http)
    assert cloud.iam.calls == 2


@pytest.mark.parametrize(
    "creds",
    [{"password": "wrong"}, {"user": "someone-else"}, {"domain": "other-account"}],
)
async def test_wrong_credentials_return_the_exact_iam_401_body(
    cloud: FakeCloud, http: aiohttp.ClientSession, creds: dict[str, Any]
) -> None:
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=password_body(**creds)) as resp:
        assert resp.status == 401
        assert "X-Subject-Token" not in resp.headers
        assert await resp.json() == {
            "error": {
                "code": 401,
                "title": "Unauthorized",
                "message": "The username or password is wrong.",
            }
        }


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        json.dumps({"auth": {}}).encode(),
        json.dumps(
            {"auth": {"identity": {"methods": ["token"]}, "scope": {"project": {}}}}
        ).encode(),
        json.dumps(password_body(project={})).encode(),
    ],
)
async def test_malformed_token_request_returns_400(
    cloud: FakeCloud, http: aiohttp.ClientSession, data: bytes
) -> None:
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", data=data) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == 400 and error["title"] == "Bad Request"
    assert cloud.iam.calls == 1 and len(cloud.iam.requests) == 1


async def test_unknown_project_returns_401(cloud: FakeCloud, http: aiohttp.ClientSession) -> None:
    body = password_body(project={"name": "eu-west-101"})
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=body) as resp:
        assert resp.status == 401


async def test_project_can_be_named_by_id(cloud: FakeCloud, http: aiohttp.ClientSession) -> None:
    project_id = cloud.iam.projects["cn-southwest-2"]
    body = password_body(project={"id": project_id})
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=body) as resp:
        assert resp.status == 201
        assert (await resp.json())["token"]["project"]["id"] == project_id


async def test_scripted_failures_are_returned_in_order_then_success(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.iam.failures = [500, 503, 401]
    statuses = []
    for _ in range(4):
        async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=password_body()) as resp:
            statuses.append(resp.status)
            body = await resp.json()
    assert statuses == [500, 503, 401, 201]
    assert "token" in body
    assert cloud.iam.calls == 4 and cloud.iam.failures == []


async def test_scripted_401_returns_wrong_password_body(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.iam.failures = [401]
    async with http.post(f"{cloud.iam_url}/v3/auth/tokens", json=password_body()) as resp:
        assert await resp.json() == IAM_WRONG_PASSWORD


async def test_zero_lifetime_token_is_already_expired(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.iam.token_lifetime = 0.0
    assert not cloud.iam.is_valid(await get_token(cloud, http))


async def test_agency_token_needs_a_valid_caller_token(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    body = {
        "auth": {
            "identity": {
                "methods": ["assume_role"],
                "assume_role": {"domain_name": "other-account", "agency_name": "modelarts-agency"},
            },
            "scope": {"project": {"name": "cn-southwest-2"}},
        }
    }
    url = f"{cloud.iam_url}/v3/auth/tokens"
    async with http.post(url, json=body, headers={"X-Auth-Token": "bogus"}) as resp:
        assert resp.status == 401
    caller = await get_token(cloud, http)
    async with http.post(url, json=body, headers={"X-Auth-Token": caller}) as resp:
        assert resp.status == 201
        agency_token = resp.headers["X-Subject-Token"]
        token = (await resp.json())["token"]
    assert token["methods"] == ["assume_role"]
    assert token["user"]["domain"]["name"] == "other-account"
    assert cloud.iam.is_valid(agency_token)


# --- ModelArts ------------------------------------------------------------------------------


async def test_missing_token_is_rejected_by_apig(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json=chat_body(stream=False)) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error_code"] == "APIG.0301"
    assert body["error_msg"].endswith("x-auth-token not found")
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert cloud.modelarts.unauthorized == 1
    assert cloud.modelarts.requests[0].path.endswith("/v1/chat/completions")


async def test_invalid_token_is_rejected_with_apig_0307(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(
        url, json=chat_body(stream=False), headers={"X-Auth-Token": "MIIbogus"}
    ) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert resp.headers["X-Request-Id"] == body["request_id"]
    assert body["error_code"] == "APIG.0307"
    assert body["error_msg"] == "The token must be updated."
    assert cloud.modelarts.unauthorized == 1
    recorded = cloud.modelarts.requests[0]
    assert recorded.headers["X-Auth-Token"] == "MIIbogus"
    assert json.loads(recorded.body) == chat_body(stream=False)


async def test_revoke_all_makes_later_calls_401(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/models"
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["id"] == "qwen2-7b"
    cloud.iam.revoke_all()
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error_code"] == "APIG.0307"


async def test_stream_has_exact_content_type_and_ends_with_done(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 3
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    body = chat_body(stream=True, stream_options={"include_usage": True})
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == SSE_CONTENT_TYPE
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    payloads = sse_payloads(raw)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "token0 token1 token2 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert cloud.modelarts.open_streams == 0 and cloud.modelarts.stream_closed.is_set()


async def test_split_events_carry_the_same_bytes(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.split_events = True
    cloud.modelarts.script.split_pause = 0.01
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    async with http.post(f"{cloud.service_url}/v1/sse", json={}, headers=headers) as resp:
        assert resp.headers["Content-Type"] == SSE_CONTENT_TYPE
        raw = await resp.read()
    assert len(sse_payloads(raw)) == 1 + 5 + 1 + 1  # role, content, finish, [DONE]
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_non_stream_returns_chat_completion(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 2
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/chat/completions"
    two_words = [{"role": "user", "content": "hello there"}]  # prompt_tokens counts words
    async with http.post(url, json=chat_body(False, messages=two_words), headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "token0 token1 "}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


async def test_body_without_messages_returns_400(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json={"model": "x"}, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["object"] == "error"


async def test_unknown_path_returns_apig_404(cloud: FakeCloud, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{cloud.service_url}/v1/chat/completions") as resp:
        assert resp.status == 404
        assert (await resp.json())["error_code"] == "APIG.0101"
    assert cloud.modelarts.requests[0].method == "GET"


async def test_scripted_status_returns_apig_body(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.status = 429
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json=chat_body(stream=False), headers=headers) as resp:
        assert resp.status == 429
        assert (await resp.json())["error_code"] == "APIG.0308"


async def test_reset_after_aborts_the_stream(cloud: FakeCloud, http: aiohttp.ClientSession) -> None:
    cloud.modelarts.script.reset_after = 2
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await asyncio.wait_for(cloud.modelarts.stream_closed.wait(), 5)
    assert cloud.modelarts.disconnects == 0 and cloud.modelarts.open_streams == 0


async def test_client_leaving_a_stalled_stream_counts_a_disconnect(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.stall_after = 2
    headers = {"X-Auth-Token": await get_token(cloud, http)}
    url = f"{cloud.service_url}/v1/chat/completions"
    async with http.post(url, json=chat_body(stream=True), headers=headers) as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        assert cloud.modelarts.open_streams == 1
        resp.close()
    await asyncio.wait_for(cloud.modelarts.stream_closed.wait(), 5)
    assert cloud.modelarts.disconnects == 1
    assert cloud.modelarts.open_streams == 0


async def test_two_fakes_do_not_share_state(http: aiohttp.ClientSession) -> None:
    first, second = FakeIAM(), FakeIAM()
    runner, url = await serve_on_loopback(first.app)
    try:
        async with http.post(f"{url}/v3/auth/tokens", json=password_body()) as resp:
            token = resp.headers["X-Subject-Token"]
    finally:
        await runner.cleanup()
    assert first.is_valid(token) and not second.is_valid(token)
    assert second.calls == 0
    assert FakeModelArts().script is not FakeModelArts().script
