"""Team mode (issue 3): API keys, the refusal to expose an open gateway, Host/Origin, hash-key.

Every test runs the real gateway on a loopback socket in front of the fake cloud; the CLI tests run
``python -m gateway`` (or the console script) in a subprocess. Nothing here binds a non-loopback
address: the exposure rules are checked at parse time and in the CLI, which refuses before binding.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import MODEL, GatewayFactory, RunningGateway, chat_body, run_gateway_cli

from gateway.config.load import ConfigError, parse_settings
from gateway.testing import FakeCloud

WAIT = 5.0  # bound on awaiting something that must happen (shared, slow CI machines)

ALICE_KEY = "sk-alice-9f2c7e41d0b3"  # listed as `key:`
BOB_KEY = "sk-bob-5a81c3e6f7d2"  # listed as `sha256:`
CAROL_KEY = "sk-carol-0e4b9d2a6c18"  # may use MODEL only
OTHER_MODEL = "llama3-8b"


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def team(alice_concurrency: int | None = None, **listen: Any) -> Callable[[dict[str, Any]], None]:
    """Config edit: three keys (plain, sha256, model-restricted) and a route serving two models."""

    def edit(config: dict[str, Any]) -> None:
        alice: dict[str, Any] = {"name": "alice", "key": ALICE_KEY}
        if alice_concurrency is not None:
            alice["max_concurrency"] = alice_concurrency
        config["listen"]["api_keys"] = [
            alice,
            {"name": "bob", "sha256": sha256_hex(BOB_KEY)},
            {"name": "carol", "key": CAROL_KEY, "models": [MODEL]},
        ]
        config["listen"].update(listen)
        config["routes"][0]["models"] = [MODEL, OTHER_MODEL]

    return edit


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def port_of(gw: RunningGateway) -> int:
    port: int = gw.runner.addresses[0][1]
    return port


async def post_chat(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST a chat completion; (status, JSON or raw bytes, response)."""
    payload = chat_body(stream=body.pop("stream", False), **body)
    async with http.post(
        gw.url + "/v1/chat/completions", json=payload, headers=headers or {}
    ) as resp:
        raw = await resp.read()
        data: Any = await resp.json() if resp.content_type == "application/json" else raw
        return resp.status, data, resp


def assert_openai_error(data: Any, code: str) -> None:
    assert isinstance(data, dict) and set(data) == {"error"}, data
    error = data["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error


def upstream_header_names(cloud: FakeCloud) -> list[set[str]]:
    return [{name.lower() for name in r.headers} for r in cloud.modelarts.requests]


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Await a condition another task will make true (bounded polling, no fixed wait)."""
    for _ in range(int(WAIT / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


# --- API keys ---------------------------------------------------------------------------------


async def test_missing_api_key_returns_401_openai_shaped_and_nothing_goes_upstream(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())
    status, data, resp = await post_chat(http, gw)
    assert status == 401
    assert resp.content_type == "application/json"
    assert_openai_error(data, "missing_api_key")
    assert data["error"]["type"] == "authentication_error"
    assert resp.headers["X-Request-Id"]
    assert cloud.modelarts.requests == []


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {ALICE_KEY}x",
        f"Bearer {ALICE_KEY[:-1]}",
        "Bearer sk-not-a-key",
        f"Bearer {sha256_hex(BOB_KEY)}",  # the digest from the config is not a key
        f"Basic {ALICE_KEY}",
    ],
)
async def test_wrong_api_key_returns_401_and_nothing_goes_upstream(
    make_gateway: GatewayFactory,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    authorization: str,
) -> None:
    gw = await make_gateway(team())
    status, data, _ = await post_chat(http, gw, {"Authorization": authorization})
    assert status == 401
    expected = "missing_api_key" if authorization.startswith("Basic") else "invalid_api_key"
    assert_openai_error(data, expected)
    assert authorization.split(" ", 1)[1] not in str(data)
    assert cloud.modelarts.requests == []


@pytest.mark.parametrize(("key", "name"), [(ALICE_KEY, "alice"), (BOB_KEY, "bob")])
async def test_plain_and_sha256_keys_pass_and_are_never_forwarded_upstream(
    make_gateway: GatewayFactory,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    key: str,
    name: str,
) -> None:
    gw = await make_gateway(team())
    status, data, _ = await post_chat(http, gw, bearer(key))
    assert status == 200, data
    assert data["object"] == "chat.completion"
    async with http.post(
        gw.url + "/v1/chat/completions", json=chat_body(), headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")

    assert len(cloud.modelarts.requests) == 2
    for recorded in cloud.modelarts.requests:
        names = {n.lower() for n in recorded.headers}
        assert "authorization" not in names
        assert key not in repr(recorded.headers)
        token = recorded.headers["X-Auth-Token"]
        assert cloud.iam.is_valid(token), "X-Auth-Token must be the IAM token"
        assert key not in recorded.body.decode()
    assert gw.metric("gateway_key_requests_total", key=name, status="200") == 2


async def test_client_x_auth_token_is_replaced_by_the_gateway_token(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())
    headers = {**bearer(ALICE_KEY), "X-Auth-Token": "client-forged-token"}
    status, _, _ = await post_chat(http, gw, headers)
    assert status == 200
    (recorded,) = cloud.modelarts.requests
    assert "client-forged-token" not in repr(recorded.headers)
    assert cloud.iam.is_valid(recorded.headers["X-Auth-Token"])


async def test_openai_sdk_api_key_is_accepted_and_a_wrong_one_raises_authentication_error(
    make_gateway: GatewayFactory, cloud: FakeCloud
) -> None:
    gw = await make_gateway(team())
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=ALICE_KEY, max_retries=0
    ) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
        assert completion.choices[0].message.content
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts).startswith("token0")
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL, OTHER_MODEL]

    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"

    assert len(cloud.modelarts.requests) == 2
    for names in upstream_header_names(cloud):
        assert "authorization" not in names
    # two completions and the model list
    assert gw.metric("gateway_key_requests_total", key="alice", status="200") == 3


async def test_per_key_max_concurrency_returns_429_while_other_keys_pass(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team(alice_concurrency=1))
    cloud.modelarts.script.header_delay = 1.0
    held = asyncio.create_task(post_chat(http, gw, bearer(ALICE_KEY)))
    try:
        await until(lambda: len(cloud.modelarts.requests) == 1, "alice's request went upstream")
        cloud.modelarts.script.header_delay = 0.0  # the held request has read its delay already

        status, data, resp = await post_chat(http, gw, bearer(ALICE_KEY))
        assert status == 429
        # a key's limits answer like OpenAI's own (issue 11); a route's stays concurrency_limit
        assert_openai_error(data, "rate_limit_exceeded")
        assert resp.headers["Retry-After"] == "1"
        assert "alice" in data["error"]["message"]
        assert len(cloud.modelarts.requests) == 1, "a refused request must not go upstream"

        status, _, _ = await post_chat(http, gw, bearer(BOB_KEY))
        assert status == 200, "another key has its own limit"
    finally:
        status, _, _ = await held
    assert status == 200

    status, _, _ = await post_chat(http, gw, bearer(ALICE_KEY))
    assert status == 200, "the slot is released when the held request ends"
    assert gw.metric("gateway_key_requests_total", key="alice", status="429") == 1
    assert gw.metric("gateway_key_requests_total", key="alice", status="200") == 2
    assert gw.metric("gateway_rejected_total", route="chat", reason="rate_limit_exceeded") == 1
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="max_concurrency") == 1


async def test_key_models_allowlist_returns_403_for_another_model(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())
    status, data, _ = await post_chat(http, gw, bearer(CAROL_KEY), model=OTHER_MODEL)
    assert status == 403
    assert_openai_error(data, "model_not_allowed")
    assert data["error"]["type"] == "permission_error"
    assert cloud.modelarts.requests == []

    status, _, _ = await post_chat(http, gw, bearer(CAROL_KEY), model=MODEL)
    assert status == 200
    status, _, _ = await post_chat(http, gw, bearer(ALICE_KEY), model=OTHER_MODEL)
    assert status == 200, "an unrestricted key may use every model"
    assert gw.metric("gateway_key_requests_total", key="carol", status="403") == 1


async def test_restricted_key_without_a_model_in_the_body_is_refused(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())
    async with http.get(gw.url + "/v1/files", headers=bearer(CAROL_KEY)) as resp:
        assert resp.status == 403
        assert_openai_error(await resp.json(), "model_not_allowed")
    assert cloud.modelarts.requests == []


async def test_v1_models_lists_only_the_models_a_key_may_use(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())

    async def listed(key: str) -> list[str]:
        async with http.get(gw.url + "/v1/models", headers=bearer(key)) as resp:
            assert resp.status == 200
            return [m["id"] for m in (await resp.json())["data"]]

    assert await listed(CAROL_KEY) == [MODEL]
    assert await listed(ALICE_KEY) == [MODEL, OTHER_MODEL]
    assert await listed(BOB_KEY) == [MODEL, OTHER_MODEL]
    async with http.get(gw.url + "/v1/models") as resp:
        assert resp.status == 401
        assert_openai_error(await resp.json(), "missing_api_key")
    async with http.get(gw.url + "/v1/models", headers=bearer("sk-wrong")) as resp:
        assert resp.status == 401
        assert_openai_error(await resp.json(), "invalid_api_key")


async def test_key_requests_metric_counts_by_name_and_never_shows_a_key(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team())
    for _ in range(3):
        assert (await post_chat(http, gw, bearer(ALICE_KEY)))[0] == 200
    assert (await post_chat(http, gw, bearer(BOB_KEY)))[0] == 200
    assert (await post_chat(http, gw, bearer(CAROL_KEY), model=OTHER_MODEL))[0] == 403
    assert (await post_chat(http, gw, bearer("sk-nobody")))[0] == 401

    assert gw.metric("gateway_key_requests_total", key="alice", status="200") == 3
    assert gw.metric("gateway_key_requests_total", key="bob", status="200") == 1
    assert gw.metric("gateway_key_requests_total", key="carol", status="403") == 1
    assert gw.metric("gateway_rejected_total", route="-", reason="invalid_api_key") == 1
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    key_lines = [line for line in text.splitlines() if line.startswith("gateway_key_requests")]
    assert key_lines
    names = {line.split('key="', 1)[1].split('"', 1)[0] for line in key_lines}
    assert names == {"alice", "bob", "carol"}
    for secret in (ALICE_KEY, BOB_KEY, CAROL_KEY, "sk-nobody", sha256_hex(BOB_KEY)):
        assert secret not in text


# --- refusing to expose an open gateway ----------------------------------------------------------


def config_with(cloud_like: dict[str, Any], **listen: Any) -> dict[str, Any]:
    config = dict(cloud_like)
    config["listen"] = {**config["listen"], **listen}
    return config


STATIC = {
    "listen": {"host": "127.0.0.1", "port": 0},
    "credentials": {"tok": {"type": "token", "token": "t"}},
    "routes": [
        {
            "name": "chat",
            "path": "/v1",
            "upstream": "https://example.com/v1/infers/abc",
            "credential": "tok",
        }
    ],
}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "gw.example"])
def test_non_loopback_host_without_api_keys_is_a_config_error(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(config_with(STATIC, host=host), {})
    (problem,) = info.value.problems
    assert problem.startswith("listen.host:")
    assert host in problem
    assert "api_keys" in problem and "allow_unauthenticated_remote" in problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_need_no_api_keys(host: str) -> None:
    settings = parse_settings(config_with(STATIC, host=host), {})
    assert settings.listen.api_keys == ()


def test_non_loopback_host_with_api_keys_or_explicit_opt_in_parses() -> None:
    keys = [{"name": "a", "key": "k" * 20}]
    with_keys = parse_settings(config_with(STATIC, host="0.0.0.0", api_keys=keys), {})
    assert [k.name for k in with_keys.listen.api_keys] == ["a"]
    opted_in = parse_settings(
        config_with(STATIC, host="0.0.0.0", allow_unauthenticated_remote=True), {}
    )
    assert opted_in.listen.allow_unauthenticated_remote is True
    assert opted_in.listen.api_keys == ()


def test_allow_unauthenticated_remote_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(config_with(STATIC, host="0.0.0.0", allow_unauthenticated_remote="yes"), {})
    assert any(p.startswith("listen.allow_unauthenticated_remote:") for p in info.value.problems)
    assert any(p.startswith("listen.host:") for p in info.value.problems)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_gateway(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_gateway_cli(*args, env=cli_env(), stdin=stdin)


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_serve_on_a_non_loopback_host_without_keys_exits_2_with_the_reason(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, config_with(STATIC, host="0.0.0.0", port=8080))
    result = run_gateway("--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "listen.host" in result.stderr
    assert "api_keys" in result.stderr
    assert "Traceback" not in result.stderr


def test_host_override_to_a_wildcard_on_a_loopback_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_with(STATIC, port=8080))
    result = run_gateway("serve", "--config", str(path), "--host", "0.0.0.0")
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr
    assert "'0.0.0.0'" in result.stderr and "api_keys" in result.stderr
    assert "Traceback" not in result.stderr


# --- Host and Origin (a browser page must not use a local gateway) --------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost."]
)
async def test_foreign_host_header_returns_403_host_not_allowed(
    gateway: RunningGateway, cloud: FakeCloud, http: aiohttp.ClientSession, host: str
) -> None:
    headers = {"Host": host.format(port=port_of(gateway))}
    status, data, _ = await post_chat(http, gateway, headers)
    assert status == 403
    assert_openai_error(data, "host_not_allowed")
    async with http.get(gateway.url + "/v1/anything", headers=headers) as resp:
        assert resp.status == 403
    assert cloud.modelarts.requests == []
    assert gateway.metric("gateway_rejected_total", route="-", reason="host_not_allowed") == 2


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "LocalHost:{port}"])
async def test_local_host_headers_are_allowed(
    gateway: RunningGateway, http: aiohttp.ClientSession, host: str
) -> None:
    status, data, _ = await post_chat(http, gateway, {"Host": host.format(port=port_of(gateway))})
    assert status == 200, data


async def test_allowed_hosts_entry_is_accepted_and_others_still_refused(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(lambda c: c["listen"].update(allowed_hosts=["Gateway.Internal"]))
    port = port_of(gw)
    for host in ("gateway.internal", f"gateway.internal:{port}", f"127.0.0.1:{port}"):
        status, data, _ = await post_chat(http, gw, {"Host": host})
        assert status == 200, (host, data)
    status, data, _ = await post_chat(http, gw, {"Host": "other.internal"})
    assert status == 403
    assert_openai_error(data, "host_not_allowed")


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_are_not_subject_to_the_host_check(
    gateway: RunningGateway, http: aiohttp.ClientSession, path: str
) -> None:
    # Kubernetes probes use the pod IP as Host
    await post_chat(http, gateway)  # the credential has a token: /readyz can say 200
    async with http.get(gateway.url + path, headers={"Host": "10.1.2.3:8080"}) as resp:
        assert resp.status == 200, await resp.text()


async def test_v1_models_is_subject_to_the_host_and_origin_checks(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(lambda c: c["routes"][0].update(models=[MODEL]))
    async with http.get(gw.url + "/v1/models", headers={"Host": "evil.example"}) as resp:
        assert resp.status == 403
        assert_openai_error(await resp.json(), "host_not_allowed")
    async with http.get(gw.url + "/v1/models", headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert_openai_error(await resp.json(), "origin_not_allowed")


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:3000"])
async def test_foreign_origin_returns_403_origin_not_allowed(
    gateway: RunningGateway, cloud: FakeCloud, http: aiohttp.ClientSession, origin: str
) -> None:
    status, data, resp = await post_chat(http, gateway, {"Origin": origin})
    assert status == 403
    assert_openai_error(data, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert cloud.modelarts.requests == []


APP_ORIGIN = "https://app.example"


def cors(**listen: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["listen"]["allowed_origins"] = [APP_ORIGIN + "/"]  # a trailing / is tolerated
        config["listen"].update(listen)

    return edit


async def test_allowed_origin_gets_200_with_cors_headers(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(cors())
    status, data, resp = await post_chat(http, gw, {"Origin": APP_ORIGIN})
    assert status == 200, data
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "Origin" in resp.headers.getall("Vary", [])
    async with http.post(
        gw.url + "/v1/chat/completions", json=chat_body(), headers={"Origin": APP_ORIGIN}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    status, data, _ = await post_chat(http, gw, {"Origin": "https://evil.example"})
    assert status == 403
    assert_openai_error(data, "origin_not_allowed")


def preflight_headers(origin: str = APP_ORIGIN) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def assert_preflight_ok(http: aiohttp.ClientSession, gw: RunningGateway, path: str) -> None:
    async with http.options(gw.url + path, headers=preflight_headers()) as resp:
        assert resp.status == 204, await resp.text()
        assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = resp.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert int(resp.headers["Access-Control-Max-Age"]) > 0


async def test_cors_preflight_from_an_allowed_origin_returns_204_with_allow_headers(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(cors())
    await assert_preflight_ok(http, gw, "/v1/chat/completions")
    async with http.options(
        gw.url + "/v1/chat/completions", headers=preflight_headers("https://evil.example")
    ) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert cloud.modelarts.requests == [], "a preflight is answered by the gateway"


async def test_cors_preflight_needs_no_api_key_and_the_request_after_it_does(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    # Browsers never send credentials on a preflight (Fetch standard, CORS-preflight request)
    gw = await make_gateway(cors(api_keys=[{"name": "alice", "key": ALICE_KEY}]))
    await assert_preflight_ok(http, gw, "/v1/chat/completions")
    await assert_preflight_ok(http, gw, "/v1/models")
    status, data, resp = await post_chat(http, gw, {"Origin": APP_ORIGIN})
    assert status == 401
    assert_openai_error(data, "missing_api_key")
    status, _, resp = await post_chat(http, gw, {"Origin": APP_ORIGIN, **bearer(ALICE_KEY)})
    assert status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert len(cloud.modelarts.requests) == 1


async def test_errors_to_an_allowed_origin_carry_cors_headers_so_the_page_can_read_them(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(cors(api_keys=[{"name": "alice", "key": ALICE_KEY}]))
    status, _, resp = await post_chat(http, gw, {"Origin": APP_ORIGIN, **bearer("sk-wrong")})
    assert status == 401
    assert resp.headers.get("Access-Control-Allow-Origin") == APP_ORIGIN


async def test_v1_models_answers_an_allowed_origin_with_cors_headers(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        cors()(config)
        config["routes"][0]["models"] = [MODEL]

    gw = await make_gateway(edit)
    async with http.get(gw.url + "/v1/models", headers={"Origin": APP_ORIGIN}) as resp:
        assert resp.status == 200
        assert resp.headers.get("Access-Control-Allow-Origin") == APP_ORIGIN


# --- hash-key ----------------------------------------------------------------------------------


def console_script() -> str:
    path = Path(sys.executable).parent / "modelarts-gateway"
    assert path.exists(), "the console script is installed with the package"
    return str(path)


@pytest.mark.parametrize("via", ["argument", "stdin"])
def test_hash_key_prints_the_sha256_hex_of_the_key(via: str) -> None:
    key = "sk-team-31415926"
    args = [console_script(), "hash-key"] + ([key] if via == "argument" else [])
    result = subprocess.run(
        args,
        env=cli_env(),
        capture_output=True,
        text=True,
        input=key + "\n" if via == "stdin" else None,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == sha256_hex(key) + "\n"
    assert key not in result.stdout + result.stderr


def test_hash_key_with_empty_stdin_exits_2() -> None:
    result = run_gateway("hash-key", stdin="")
    assert result.returncode == 2
    assert "no key" in result.stderr
    assert "Traceback" not in result.stderr


async def test_hash_key_output_works_as_sha256_in_the_config(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    key = "sk-from-hash-key-2718"
    result = await asyncio.to_thread(run_gateway, "hash-key", stdin=key + "\n")
    digest = result.stdout.strip()
    gw = await make_gateway(
        lambda c: c["listen"].update(api_keys=[{"name": "ci", "sha256": digest.upper()}])
    )
    assert (await post_chat(http, gw, bearer(key)))[0] == 200
    assert (await post_chat(http, gw, bearer(digest)))[0] == 401
    assert gw.metric("gateway_key_requests_total", key="ci", status="200") == 1


def test_config_with_a_malformed_sha256_names_the_key() -> None:
    bad = config_with(STATIC, api_keys=[{"name": "a", "sha256": "abc"}])
    with pytest.raises(ConfigError) as info:
        parse_settings(bad, {})
    assert any(p.startswith("listen.api_keys[0].sha256:") for p in info.value.problems)


@pytest.mark.parametrize("length", [3, 8, 19])
def test_a_plaintext_key_shorter_than_20_characters_is_a_config_error(length: int) -> None:
    key = ("Q7z" * 7)[:length]
    bad = config_with(STATIC, api_keys=[{"name": "a", "key": key}])
    with pytest.raises(ConfigError) as info:
        parse_settings(bad, {})
    [problem] = info.value.problems
    assert problem.startswith("listen.api_keys[0].key: is shorter than 20 characters")
    assert "hash-key --generate" in problem
    assert key not in problem, "the message never quotes the key"


def test_a_20_character_key_and_a_short_key_given_as_sha256_parse() -> None:
    keys = [{"name": "a", "key": "y" * 20}, {"name": "b", "sha256": sha256_hex("short")}]
    settings = parse_settings(config_with(STATIC, api_keys=keys), {})
    assert [k.name for k in settings.listen.api_keys] == ["a", "b"]


async def test_hash_key_generate_prints_a_new_random_key_that_works_with_its_sha256(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    first, second = [await asyncio.to_thread(run_gateway, "hash-key", "--generate") for _ in "ab"]
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    lines = dict(line.split(": ", 1) for line in first.stdout.splitlines())
    key, digest = lines["key"], lines["sha256"]
    assert len(key) >= 40 and digest == sha256_hex(key)
    assert key not in second.stdout, "every run draws a new key"
    gw = await make_gateway(
        lambda c: c["listen"].update(api_keys=[{"name": "gen", "sha256": digest}])
    )
    assert (await post_chat(http, gw, bearer(key)))[0] == 200
    assert (await post_chat(http, gw, bearer(key[:-1])))[0] == 401
