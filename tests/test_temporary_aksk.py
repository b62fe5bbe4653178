"""Temporary AK/SK from the platform, end to end (issue 12, item 2): client → gateway → fake
ModelArts that verifies each signature with the temporary AK/SK and security token it issued,
the keys coming from fakes of the ECS metadata service and CCE pod identity on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, RunningGateway, chat_body, free_port

from gateway.credentials import temporary_aksk, token_cache
from gateway.credentials.temporary_aksk import TemporaryAkSk
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud
from gateway.testing.metadata import Platform, start_platform

POD_TOKEN = "pod-identity-token-eyJhbGciOiJSUzI1NiJ9.c2VydmljZWFjY291bnQ"
ENV_SK = "env-secret-key-0123456789abcdefghijklmnop"
ENV_TOKEN = "env-security-token-0123456789abcdefghijklmnop"


@pytest.fixture
async def platform(cloud: FakeCloud) -> AsyncIterator[Platform]:
    cloud.modelarts.token_checker = None  # an AK/SK-signed service: no IAM tokens accepted
    # a permanent key of someone else's: the service stays AK/SK-protected when all keys the
    # platform issued are revoked (a fake with no keys at all is an open service)
    cloud.modelarts.aksk["SOMEONEELSE000000000"] = "someone-elses-secret"
    fake = await start_platform([cloud.modelarts], POD_TOKEN)
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "pod-token"
    path.write_text(POD_TOKEN + "\n")
    return path


def use(credential: dict[str, Any]) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"] = credential

    return edit


def metadata_cred(platform: Platform, **extra: Any) -> dict[str, Any]:
    return {"type": "ecs_metadata", "metadata_url": platform.metadata_url, **extra}


def pod_cred(platform: Platform, token_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "pod_identity",
        "uri": platform.pod_identity_url,
        "token_file": str(token_file),
        **extra,
    }


async def chat(
    http: aiohttp.ClientSession, gw: RunningGateway, *, stream: bool = False
) -> tuple[int, bytes]:
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(stream)) as resp:
        return resp.status, await resp.read()


def credential_of(gw: RunningGateway) -> TemporaryAkSk:
    credential = gw.app[GATEWAY].credentials["main"]
    assert isinstance(credential, TemporaryAkSk)
    return credential


def shift_clock(gw: RunningGateway, offset: float) -> None:
    credential_of(gw).cache._now = lambda: time.time() + offset


def access_keys_seen(cloud: FakeCloud) -> list[str]:
    seen = []
    for request in cloud.modelarts.requests:
        authorization = request.headers.get("Authorization", "")
        seen.append(authorization.split("Access=", 1)[-1].split(",", 1)[0])
    return seen


def secrets_of(platform: Platform) -> list[str]:
    values = [POD_TOKEN, ENV_SK, ENV_TOKEN, *platform.metadata.valid_tokens]
    for keys in platform.issuer.issued:
        values += [keys.secret, keys.security_token]
    return values


def assert_no_secrets(platform: Platform, *texts: str | bytes) -> None:
    for text in texts:
        shown = text.decode(errors="replace") if isinstance(text, bytes) else text
        for secret in secrets_of(platform):
            assert secret not in shown


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


# --- ecs_metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_ecs_metadata_with_session_tokens_signs_with_the_agency_keys(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    gw = await make_gateway(use(metadata_cred(platform)))
    status, body = await chat(http, gw, stream=stream)
    assert status == 200, body
    assert body.endswith(b"data: [DONE]\n\n") if stream else b"chat.completion" in body
    keys = platform.issuer.issued[-1]
    seen = cloud.modelarts.requests[-1].headers
    assert seen["X-Security-Token"] == keys.security_token
    assert f"Access={keys.access}," in seen["Authorization"]
    assert "x-security-token" in seen["Authorization"]  # signed, not only sent
    assert cloud.modelarts.authenticated == ["aksk"]
    md = platform.metadata
    assert [r.method for r in md.requests] == ["PUT", "GET"]
    assert md.ttl_asked == ["21600"]
    assert md.requests[1].headers["X-Metadata-Token"] in md.valid_tokens
    assert_no_secrets(platform, body, log_text(captured_logs))


@pytest.mark.parametrize("no_tokens", [404, 405, 503])
async def test_ecs_metadata_without_session_tokens_asks_without_one(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    no_tokens: int,
) -> None:
    platform.metadata.session_tokens = False
    platform.metadata.no_token_status = no_tokens
    gw = await make_gateway(use(metadata_cred(platform)))
    for stream in (False, True):
        assert (await chat(http, gw, stream=stream))[0] == 200
    get = platform.metadata.requests[-1]
    assert get.method == "GET" and "X-Metadata-Token" not in get.headers
    assert platform.metadata.calls == 1  # the keys are cached


async def test_another_put_status_is_a_failure_not_a_service_without_tokens(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.metadata.session_tokens = False
    platform.metadata.no_token_status = 500
    gw = await make_gateway(use(metadata_cred(platform)))
    status, body = await chat(http, gw)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "credential_unavailable"
    assert platform.metadata.calls == 0  # never asked for keys without a session token


async def test_a_stale_session_token_gets_one_new_one_and_the_session_token_is_reused(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.metadata.reuse = False
    gw = await make_gateway(use(metadata_cred(platform)))
    assert (await chat(http, gw))[0] == 200
    credential_of(gw).cache.invalidate(platform.issuer.issued[-1].access)
    assert (await chat(http, gw))[0] == 200
    assert platform.metadata.token_puts == 1  # the second fetch reused the session token
    platform.metadata.expire_session_tokens()
    credential_of(gw).cache.invalidate(platform.issuer.issued[-1].access)
    assert (await chat(http, gw))[0] == 200
    methods = [r.method for r in platform.metadata.requests]
    assert methods == ["PUT", "GET", "GET", "GET", "PUT", "GET"]
    assert platform.metadata.token_puts == 2


async def test_no_agency_bound_is_a_clear_502_and_readyz_says_why(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    platform.metadata.agency = False
    gw = await make_gateway(use(metadata_cred(platform)))
    status, body = await chat(http, gw)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "credential_unavailable"
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 503
        problems = (await resp.json())["problems"]
    assert any("no agency is bound" in p for p in problems)
    assert "no agency is bound" in log_text(captured_logs)
    assert platform.metadata.token_puts == 1  # "no agency" is not cured by a new session token


# --- pod_identity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "metadata_shape"), [(False, False), (True, False), (False, True)]
)
async def test_pod_identity_posts_the_pod_token_and_signs_with_its_keys(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    captured_logs: pytest.LogCaptureFixture,
    stream: bool,
    metadata_shape: bool,
) -> None:
    platform.pod_identity.metadata_shape = metadata_shape
    gw = await make_gateway(use(pod_cred(platform, token_file)))
    status, body = await chat(http, gw, stream=stream)
    assert status == 200, body
    keys = platform.issuer.issued[-1]
    seen = cloud.modelarts.requests[-1].headers
    assert seen["X-Security-Token"] == keys.security_token
    assert f"Access={keys.access}," in seen["Authorization"]
    pod = platform.pod_identity
    assert [r.method for r in pod.requests] == ["POST"]
    assert pod.requests[0].headers["Authorization"] == POD_TOKEN  # stripped of its newline
    assert json.loads(pod.bodies[0]) == {}
    assert_no_secrets(platform, body, log_text(captured_logs))


async def test_pod_identity_takes_uri_and_token_file_from_the_environment(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession, token_file: Path
) -> None:
    environ = {
        "HC_CONTAINER_CREDENTIALS_FULL_URI": platform.pod_identity_url,
        "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    gw = await make_gateway(use({"type": "pod_identity"}), environ=environ)
    assert (await chat(http, gw))[0] == 200
    assert platform.pod_identity.calls == 1


async def test_pod_identity_reads_the_rotated_token_file_at_each_fetch(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession, token_file: Path
) -> None:
    platform.pod_identity.reuse = False
    gw = await make_gateway(use(pod_cred(platform, token_file)))
    assert (await chat(http, gw))[0] == 200
    platform.pod_identity.token = "rotated-pod-token-2"
    write_file(token_file, "rotated-pod-token-2")  # the kubelet rotates the projected token
    credential_of(gw).cache.invalidate(platform.issuer.issued[-1].access)
    assert (await chat(http, gw))[0] == 200
    assert platform.pod_identity.requests[-1].headers["Authorization"] == "rotated-pod-token-2"


async def test_a_missing_pod_token_file_is_a_502_naming_the_path(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-token"
    gw = await make_gateway(use(pod_cred(platform, missing)))
    assert (await chat(http, gw))[0] == 502
    async with http.get(gw.url + "/readyz") as resp:
        problems = (await resp.json())["problems"]
    assert any(str(missing) in p for p in problems)
    assert platform.pod_identity.calls == 0


async def test_a_refused_pod_token_is_a_502_without_the_token(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    platform.pod_identity.token = "another-token"
    gw = await make_gateway(use(pod_cred(platform, token_file)))
    status, body = await chat(http, gw)
    assert status == 502
    assert "HTTP 401" in log_text(captured_logs)
    assert_no_secrets(platform, body, log_text(captured_logs))


# --- refresh, single flight, back-off, replay ---------------------------------------------------


@pytest.mark.parametrize("kind", ["ecs_metadata", "pod_identity"])
async def test_keys_are_refreshed_in_the_background_before_they_expire(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    kind: str,
) -> None:
    service = platform.metadata if kind == "ecs_metadata" else platform.pod_identity
    service.reuse = False
    cred = metadata_cred(platform) if kind == "ecs_metadata" else pod_cred(platform, token_file)
    gw = await make_gateway(use({**cred, "refresh_margin": 600}))
    assert (await chat(http, gw))[0] == 200
    first = platform.issuer.issued[-1]
    cache = credential_of(gw).cache
    results: asyncio.Queue[str] = asyncio.Queue()
    cache._on_refresh = lambda name, result, expires_at: results.put_nowait(result)
    shift_clock(gw, 3600 - 900)  # 15 min before expiry: outside the margin, no refresh
    assert (await chat(http, gw))[0] == 200
    assert service.calls == 1
    shift_clock(gw, 3600 - 500)  # inside the 10 min margin: the old keys serve, a refresh runs
    assert (await chat(http, gw))[0] == 200
    assert access_keys_seen(cloud)[-1] == first.access
    assert await asyncio.wait_for(results.get(), 5) == "ok"
    second = platform.issuer.issued[-1]
    assert second.access != first.access and service.calls == 2
    platform.issuer.revoke(first)  # the old keys die: only the new ones can pass
    for stream in (False, True):
        assert (await chat(http, gw, stream=stream))[0] == 200
    assert access_keys_seen(cloud)[-1] == second.access


@pytest.mark.parametrize("kind", ["ecs_metadata", "pod_identity"])
async def test_keys_are_refreshed_before_they_expire_with_no_request_at_all(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    kind: str,
) -> None:
    """An idle sidecar: nothing asks for the keys, yet they are replaced in the margin, so the
    keys never lapse and /readyz stays 200 (an unready pod gets no traffic to wake it)."""
    service = platform.metadata if kind == "ecs_metadata" else platform.pod_identity
    service.reuse = False
    platform.issuer.lifetime = 5.0  # real seconds: the refresh is due 1 s after each fetch
    cred = metadata_cred(platform) if kind == "ecs_metadata" else pod_cred(platform, token_file)
    gw = await make_gateway(use({**cred, "refresh_margin": "4s"}))
    credential = credential_of(gw)
    first = await credential.keys()  # the start-up fetch, joined (not a request)
    results: asyncio.Queue[str] = asyncio.Queue()
    credential.cache._on_refresh = lambda name, result, expires_at: results.put_nowait(result)
    assert await asyncio.wait_for(results.get(), 5) == "ok"
    renewed = credential.cache.usable()
    assert renewed is not None and renewed.value != first.value
    assert renewed.expires_at > first.expires_at
    assert time.time() < first.expires_at  # replaced before the old keys expired
    assert cloud.modelarts.requests == []  # no request woke it
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 200


async def test_a_failed_refresh_is_retried_unasked_when_its_back_off_ends(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(token_cache, "REFRESH_INTERVAL", 0.2)  # the unasked retry's floor
    platform.metadata.reuse = False
    platform.issuer.lifetime = 4.0  # the refresh is due 2 s after each fetch
    gw = await make_gateway(use(metadata_cred(platform, refresh_margin="2s")))
    credential = credential_of(gw)
    first = await credential.keys()
    results: asyncio.Queue[str] = asyncio.Queue()
    credential.cache._on_refresh = lambda name, result, expires_at: results.put_nowait(result)
    platform.metadata.failures = [503]
    assert await asyncio.wait_for(results.get(), 5) == "error"
    assert await asyncio.wait_for(results.get(), 5) == "ok"  # after the 1 s back-off
    renewed = credential.cache.token
    assert renewed is not None and renewed.value != first.value
    assert platform.metadata.calls == 3 and cloud.modelarts.requests == []


async def test_the_old_keys_serve_while_the_source_fails_inside_the_margin(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await make_gateway(use({**metadata_cred(platform), "refresh_margin": 600}))
    assert (await chat(http, gw))[0] == 200
    first = platform.issuer.issued[-1]
    cache = credential_of(gw).cache
    results: asyncio.Queue[str] = asyncio.Queue()
    cache._on_refresh = lambda name, result, expires_at: results.put_nowait(result)
    platform.metadata.failures = [503] * 10
    shift_clock(gw, 3600 - 500)  # inside the margin: a refresh starts, and fails
    assert (await chat(http, gw, stream=True))[0] == 200
    assert await asyncio.wait_for(results.get(), 5) == "error"
    for stream in (False, True):  # back-off: no new call, the old keys serve
        assert (await chat(http, gw, stream=stream))[0] == 200
    assert set(access_keys_seen(cloud)) == {first.access}
    assert platform.metadata.calls == 2
    shift_clock(gw, 3600 - 10)  # past the safety point: no usable keys, the source backed off
    status, body = await chat(http, gw)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "credential_unavailable"


async def test_concurrent_requests_share_one_fetch(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.metadata.delay = 0.3
    gw = await make_gateway(use(metadata_cred(platform)))
    results = await asyncio.gather(*(chat(http, gw) for _ in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert platform.metadata.calls == 1


@pytest.mark.parametrize("kind", ["ecs_metadata", "pod_identity"])
async def test_a_failing_source_is_backed_off_not_hammered(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    captured_logs: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    service = platform.metadata if kind == "ecs_metadata" else platform.pod_identity
    service.failures = [500] * 100
    cred = metadata_cred(platform) if kind == "ecs_metadata" else pod_cred(platform, token_file)
    gw = await make_gateway(use(cred))
    for _ in range(5):
        status, body = await chat(http, gw)
        assert status == 502
        assert json.loads(body)["error"]["code"] == "credential_unavailable"
    assert service.calls == 1  # the first failure set a back-off: nobody asks again
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="error") == 1
    assert "next attempt in" in log_text(captured_logs)


async def test_back_off_ends_and_the_next_fetch_serves(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.metadata.failures = [503]
    gw = await make_gateway(use(metadata_cred(platform)))
    assert (await chat(http, gw))[0] == 502
    credential_of(gw).cache._retry_at = 0.0  # the back-off window has passed
    assert (await chat(http, gw))[0] == 200
    assert platform.metadata.calls == 2


async def test_refused_keys_are_replaced_and_the_request_replayed_once(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    platform.metadata.reuse = False
    gw = await make_gateway(use(metadata_cred(platform)))
    assert (await chat(http, gw))[0] == 200
    platform.issuer.revoke(platform.issuer.issued[-1])  # the agency's keys revoked early
    assert (await chat(http, gw))[0] == 502  # keys seconds old: asking again cannot help
    assert platform.metadata.calls == 1
    monkeypatch.setattr(temporary_aksk, "MIN_AGE_FOR_REPLAY", 0.0)
    assert (await chat(http, gw))[0] == 200  # 401, new keys, one replay
    assert platform.metadata.calls == 2
    assert cloud.modelarts.unauthorized == 2


async def test_keys_already_due_do_not_make_every_request_fetch(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.issuer.lifetime = 200.0  # the service hands out keys inside the 300 s margin
    gw = await make_gateway(use(metadata_cred(platform)))
    for _ in range(10):
        assert (await chat(http, gw))[0] == 200
    assert platform.metadata.calls == 1


async def test_a_margin_longer_than_the_services_rotation_lead_waits_for_the_new_keys(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    """ECS replaces its keys 10 min before they expire: a 15 min margin asks too early, gets the
    same keys back, and asks again only every 30 s until the new ones appear."""
    gw = await make_gateway(use(metadata_cred(platform, refresh_margin="15m")))
    assert (await chat(http, gw))[0] == 200
    first = platform.issuer.issued[-1]
    cache = credential_of(gw).cache
    results: asyncio.Queue[str] = asyncio.Queue()
    cache._on_refresh = lambda name, result, expires_at: results.put_nowait(result)
    shift_clock(gw, 3600 - 800)  # the gateway is inside its margin, the service not yet rotating
    assert (await chat(http, gw))[0] == 200
    assert await asyncio.wait_for(results.get(), 5) == "ok"
    for _ in range(5):
        assert (await chat(http, gw))[0] == 200
    assert platform.metadata.calls == 2  # the same keys came back: no fetch per request
    assert platform.issuer.issued == [first]
    platform.issuer.clock = lambda: time.time() + 3600 - 550  # the service has rotated
    cache._refresh_after = 0.0  # 30 s later
    assert (await chat(http, gw))[0] == 200
    assert await asyncio.wait_for(results.get(), 5) == "ok"
    second = platform.issuer.issued[-1]
    assert second.access != first.access
    platform.issuer.revoke(first)
    assert (await chat(http, gw))[0] == 200
    assert access_keys_seen(cloud)[-1] == second.access


async def test_keys_already_expired_are_a_failure_with_back_off(
    platform: Platform, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    platform.issuer.lifetime = -10.0
    gw = await make_gateway(use(metadata_cred(platform)))
    for _ in range(3):
        assert (await chat(http, gw))[0] == 502
    assert platform.metadata.calls == 1


# --- operations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ecs_metadata", "pod_identity", "sdk_default"])
async def test_metrics_and_readyz_cover_temporary_keys(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    token_file: Path,
    kind: str,
) -> None:
    creds = {
        "ecs_metadata": metadata_cred(platform),
        "pod_identity": pod_cred(platform, token_file),
        "sdk_default": sdk_cred(platform),  # no environment, no profile: the metadata service
    }
    gw = await make_gateway(use(creds[kind]))
    assert (await chat(http, gw))[0] == 200
    keys = platform.issuer.issued[-1]
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="ok") == 1
    expiry = gw.metric("gateway_token_expiry_timestamp_seconds", credential="main")
    assert expiry == pytest.approx(keys.expires_at, abs=1e-3)
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert_no_secrets(platform, text)
    assert keys.access not in text


# --- sdk_default: the SDK's chain ---------------------------------------------------------------


def sdk_cred(platform: Platform | None = None, **extra: Any) -> dict[str, Any]:
    url = platform.metadata_url if platform else f"http://127.0.0.1:{free_port()}"
    return {"type": "sdk_default", "metadata_url": url, **extra}


def pod_env(platform: Platform, token_file: Path) -> dict[str, str]:
    return {
        "HC_CONTAINER_CREDENTIALS_FULL_URI": platform.pod_identity_url,
        "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }


def write_file(path: Path, text: str) -> None:
    path.write_text(text)


def write_profile(home: Path, text: str) -> None:
    (home / ".huaweicloud").mkdir(exist_ok=True)
    (home / ".huaweicloud" / "credentials").write_text(text)


def chosen(gw: RunningGateway) -> str | None:
    chain = credential_of(gw).chain
    assert chain is not None
    return chain.chosen


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_default_takes_the_environment_first(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    token_file: Path,
    captured_logs: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    cloud.modelarts.aksk["ENVAK0123456789ABCDE"] = ENV_SK
    cloud.modelarts.security_tokens["ENVAK0123456789ABCDE"] = ENV_TOKEN
    write_profile(tmp_path, "[basic]\nak = PROFILEAK\nsk = profile-sk\n")
    environ = {
        "HUAWEICLOUD_SDK_AK": "ENVAK0123456789ABCDE",
        "HUAWEICLOUD_SDK_SK": ENV_SK,
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": ENV_TOKEN,
        "HOME": str(tmp_path),
        **pod_env(platform, token_file),
    }
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    status, body = await chat(http, gw, stream=stream)
    assert status == 200, body
    assert chosen(gw) == "environment"
    assert cloud.modelarts.requests[-1].headers["X-Security-Token"] == ENV_TOKEN
    assert platform.metadata.requests == [] and platform.pod_identity.requests == []
    logs = log_text(captured_logs)
    assert "sdk_default uses the environment" in logs
    assert "ENVAK0123456789ABCDE" not in logs
    assert_no_secrets(platform, body, logs)
    # keys that never expire export no expiry
    assert gw.metric("gateway_token_expiry_timestamp_seconds", credential="main") == 0


async def test_sdk_default_keys_from_the_environment_are_not_replayed_when_refused(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(temporary_aksk, "MIN_AGE_FOR_REPLAY", 0.0)
    environ = {"HUAWEICLOUD_SDK_AK": "ENVAKUNKNOWN", "HUAWEICLOUD_SDK_SK": ENV_SK}
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    status, body = await chat(http, gw)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_auth_rejected"
    assert cloud.modelarts.unauthorized == 1  # the same keys again could not help


async def test_sdk_default_falls_through_to_the_profile_file(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    cloud.modelarts.aksk["PROFILEAK0123456789A"] = "profile-secret-key-abcdef"
    write_profile(tmp_path, "[basic]\nak = PROFILEAK0123456789A\nsk = profile-secret-key-abcdef\n")
    environ = {"HUAWEICLOUD_SDK_AK": "only-ak-no-sk", "HOME": str(tmp_path)}
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    assert (await chat(http, gw))[0] == 200
    assert chosen(gw) == "profile file"
    assert "X-Security-Token" not in cloud.modelarts.requests[-1].headers
    assert platform.metadata.requests == []


async def test_sdk_default_credentials_file_variable_beats_home(
    cloud: FakeCloud,
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    cloud.modelarts.aksk["FILEAK"] = "file-sk"
    cloud.modelarts.security_tokens["FILEAK"] = "file-token"
    write_profile(tmp_path, "[basic]\nak = HOMEAK\nsk = home-sk\n")
    other = tmp_path / "elsewhere.ini"
    write_file(other, "[basic]\nak = FILEAK\nsk = file-sk\nsecurity_token = file-token\n")
    environ = {"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(other), "HOME": str(tmp_path)}
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    assert (await chat(http, gw))[0] == 200
    assert cloud.modelarts.requests[-1].headers["X-Security-Token"] == "file-token"


async def test_sdk_default_then_the_metadata_service(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    token_file: Path,
) -> None:
    write_profile(tmp_path, "[global]\nak = GLOBALAK\nsk = global-sk\n")  # no [basic]
    environ = {"HOME": str(tmp_path), **pod_env(platform, token_file)}
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    for stream in (False, True):
        assert (await chat(http, gw, stream=stream))[0] == 200
    assert chosen(gw) == "ecs_metadata"
    assert platform.pod_identity.requests == []


@pytest.mark.parametrize("metadata", ["unreachable", "failing", "no agency"])
async def test_sdk_default_then_pod_identity(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    token_file: Path,
    captured_logs: pytest.LogCaptureFixture,
    metadata: str,
) -> None:
    if metadata == "failing":
        platform.metadata.failures = [500]
    elif metadata == "no agency":
        platform.metadata.agency = False
    cred = sdk_cred(None if metadata == "unreachable" else platform)
    environ = {"HOME": str(tmp_path), **pod_env(platform, token_file)}
    gw = await make_gateway(use(cred), environ=environ)
    for stream in (False, True):
        assert (await chat(http, gw, stream=stream))[0] == 200
    assert chosen(gw) == "pod_identity"
    assert platform.pod_identity.calls == 1
    assert "sdk_default uses the pod_identity" in log_text(captured_logs)


async def test_sdk_default_keeps_the_source_that_answered(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    token_file: Path,
) -> None:
    platform.metadata.reuse = False
    environ = {"HOME": str(tmp_path), **pod_env(platform, token_file)}
    gw = await make_gateway(use(sdk_cred(platform)), environ=environ)
    assert (await chat(http, gw))[0] == 200
    assert chosen(gw) == "ecs_metadata"
    platform.metadata.failures = [500] * 10
    credential_of(gw).cache.invalidate(platform.issuer.issued[-1].access)
    assert (await chat(http, gw))[0] == 502  # the metadata service failing: backed off, not
    assert platform.pod_identity.requests == []  # silently swapped for another identity


async def test_sdk_default_with_no_source_is_a_502_listing_each_reason(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(use(sdk_cred()), environ={})
    status, _ = await chat(http, gw)
    assert status == 502
    async with http.get(gw.url + "/readyz") as resp:
        problem = " ".join((await resp.json())["problems"])
    assert "environment: HUAWEICLOUD_SDK_AK and HUAWEICLOUD_SDK_SK are not both set" in problem
    assert "profile file: neither HUAWEICLOUD_SDK_CREDENTIALS_FILE nor HOME is set" in problem
    assert "ecs_metadata: the metadata service is unreachable" in problem
    assert "pod_identity: HC_CONTAINER_CREDENTIALS_FULL_URI" in problem


async def test_sdk_default_stops_at_a_malformed_profile_file_without_quoting_it(
    platform: Platform,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    write_profile(tmp_path, "ak = NOSECTIONAK\nsk = no-section-secret-key\n")
    gw = await make_gateway(use(sdk_cred(platform)), environ={"HOME": str(tmp_path)})
    status, body = await chat(http, gw)
    assert status == 502
    logs = log_text(captured_logs)
    assert "is not an INI file the SDK reads" in logs
    assert "no-section-secret-key" not in logs + body.decode()
    assert platform.metadata.requests == []  # the SDK stops there too


async def test_sdk_default_refuses_the_sdks_federated_login_at_start_up() -> None:
    from gateway.config.load import ConfigError, parse_settings

    config = {
        "credentials": {"main": {"type": "sdk_default"}},
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "main"}],
    }
    environ = {"HUAWEICLOUD_SDK_IDP_ID": "idp", "HUAWEICLOUD_SDK_ID_TOKEN_FILE": "/t"}
    with pytest.raises(ConfigError) as caught:
        parse_settings(config, environ)
    assert "credentials.main.type: sdk_default: HUAWEICLOUD_SDK_IDP_ID" in str(caught.value)


# --- config -------------------------------------------------------------------------------------


def config_with(credential: dict[str, Any]) -> dict[str, Any]:
    return {
        "credentials": {"main": credential},
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "main"}],
    }


@pytest.mark.parametrize(
    ("credential", "environ", "message"),
    [
        (
            {"type": "pod_identity"},
            {},
            "credentials.main.uri: is required (or set HC_CONTAINER_CREDENTIALS_FULL_URI)",
        ),
        (
            {"type": "pod_identity", "uri": "http://127.0.0.1:1/c"},
            {},
            "credentials.main.token_file: is required (or set "
            "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
        ),
        (
            {"type": "pod_identity", "token_file": "/t"},
            {"HC_CONTAINER_CREDENTIALS_FULL_URI": "not a url"},
            "credentials.main.uri: HC_CONTAINER_CREDENTIALS_FULL_URI must be an http:// or "
            "https:// URL with a host",
        ),
        (
            {"type": "pod_identity", "uri": "ftp://x/c", "token_file": "/t"},
            {},
            "credentials.main.uri: must be an http:// or https:// URL with a host",
        ),
        (
            {"type": "ecs_metadata", "metadata_url": "169.254.169.254"},
            {},
            "credentials.main.metadata_url: must be an http:// or https:// URL with a host",
        ),
        (
            {"type": "ecs_metadata", "refresh_margin": "soon"},
            {},
            "credentials.main.refresh_margin:",
        ),
        ({"type": "sdk_default", "ak": "x"}, {}, "credentials.main.ak: unknown key"),
        (
            {"type": "sdk_default"},
            {
                "HUAWEICLOUD_OIDC_PROVIDER_URN": "urn",
                "HUAWEICLOUD_OIDC_AGENCY_URN": "urn",
                "HUAWEICLOUD_OIDC_ID_TOKEN": "jwt-never-shown",
            },
            "credentials.main.type: sdk_default: HUAWEICLOUD_OIDC_PROVIDER_URN and "
            "HUAWEICLOUD_OIDC_AGENCY_URN select the SDK's OIDC STS login",
        ),
        ({"type": "nope"}, {}, "ecs_metadata, pod_identity, sdk_default"),
    ],
)
def test_config_errors_name_the_key(
    credential: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    from gateway.config.load import ConfigError, parse_settings

    with pytest.raises(ConfigError) as caught:
        parse_settings(config_with(credential), environ)
    assert message in str(caught.value)
    assert "jwt-never-shown" not in str(caught.value)


def test_defaults_and_the_environment_read_once_at_load() -> None:
    from gateway.config.load import parse_settings
    from gateway.config.model import EcsMetadataCredential, SdkDefaultCredential

    md = parse_settings(config_with({"type": "ecs_metadata"}), {}).credentials["main"]
    assert isinstance(md, EcsMetadataCredential)
    assert str(md.metadata_url) == "http://169.254.169.254"
    assert md.refresh_margin == 300.0
    environ = {
        "HUAWEICLOUD_SDK_AK": "AK",
        "HUAWEICLOUD_SDK_SK": "SK",
        "HOME": "/home/u",
        "HC_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/c",
        "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/var/run/token",
    }
    sdk = parse_settings(config_with({"type": "sdk_default"}), environ).credentials["main"]
    assert isinstance(sdk, SdkDefaultCredential)
    environ.clear()  # later changes to the environment change nothing
    assert sdk.env_keys is not None and sdk.env_keys.ak == "AK"
    assert str(sdk.profile_file) == "/home/u/.huaweicloud/credentials"
    assert sdk.pod_identity is not None and str(sdk.pod_identity.token_file) == "/var/run/token"
    assert "SK" not in repr(sdk)


def test_plain_http_key_services_off_this_machine_are_warned_about() -> None:
    from gateway.config.load import parse_settings
    from gateway.config.risks import start_up_risks

    config = {
        "credentials": {
            "md": {"type": "ecs_metadata"},  # 169.254.169.254: link-local, no warning
            "far": {"type": "ecs_metadata", "metadata_url": "http://10.1.2.3"},
            "pod": {"type": "pod_identity", "uri": "http://pods.example/c", "token_file": "/t"},
            "near": {"type": "pod_identity", "uri": "http://169.254.170.2/c", "token_file": "/t"},
            "local": {"type": "sdk_default", "metadata_url": "http://127.0.0.1:1"},
        },
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "md"}],
    }
    risks = start_up_risks(parse_settings(config, {}))
    assert [r.split(" ", 1)[0] for r in risks] == [
        "credentials.far.metadata_url",
        "credentials.pod.uri",
    ]
    assert "temporary AK/SK cross the network unencrypted" in risks[0]
