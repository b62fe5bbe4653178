"""Every authentication mode, end to end: client → gateway → fake ModelArts (and fake IAM)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, agency, chat_body

from gateway.config.load import ConfigError, parse_settings
from gateway.testing import FakeCloud, FakeModelArts, serve_on_loopback

GW_KEY = "gw-api-key-0123456789abcdef"
APP_CODE = "appcode-5d9c0f3a8b7e4d21a0b1c2d3e4f5a6b7"
AK, SK = "HPUAL7WXZ3XKQN0VTEST", "sk-QmZpYXJ0LXNlY3JldC1rZXktZm9yLXRlc3Rz"
SECURITY_TOKEN = "gQpjbi1ub3J0aC00mfakesecuritytoken0123456789"
APP_KEY, APP_SECRET = "0117c425f71487ea362ba84dc4abe5e1", "app-secret-8c1f2e3d4c5b6a79"
SECRETS = (GW_KEY, APP_CODE, SK, SECURITY_TOKEN, APP_SECRET)


def only(cloud: FakeCloud, **modes: Any) -> None:
    """Make the fake service accept exactly these modes (no IAM tokens)."""
    ma = cloud.modelarts
    ma.token_checker = None
    for name, value in modes.items():
        setattr(ma, name, value)


def use(credential: dict[str, Any]) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"] = credential

    return edit


async def chat(
    http: aiohttp.ClientSession, url: str, *, stream: bool, **kwargs: Any
) -> tuple[int, bytes]:
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream), **kwargs) as resp:
        return resp.status, await resp.read()


def assert_no_secrets(*texts: str | bytes) -> None:
    for text in texts:
        shown = text.decode(errors="replace") if isinstance(text, bytes) else text
        for secret in SECRETS:
            assert secret not in shown


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


CLIENT_CREDENTIALS = {
    "Authorization": "Bearer client-own-key",
    "X-Auth-Token": "client-own-token",
    "X-Apig-AppCode": "client-own-code",
    "X-Security-Token": "client-own-security-token",
    "X-Sdk-Date": "20000101T000000Z",
}


@pytest.mark.parametrize("stream", [False, True])
async def test_api_key_replaces_the_clients_own_authorization(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool
) -> None:
    only(cloud, api_keys={GW_KEY})
    gw = await make_gateway(use({"type": "api_key", "key": GW_KEY}))
    status, body = await chat(http, gw.url, stream=stream, headers=CLIENT_CREDENTIALS)
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n") if stream else b"chat.completion" in body
    seen = cloud.modelarts.requests[-1].headers
    assert seen["Authorization"] == f"Bearer {GW_KEY}"
    for header in ("X-Auth-Token", "X-Apig-AppCode", "X-Security-Token"):
        assert header not in seen
    assert cloud.modelarts.authenticated == ["api_key"]


async def test_wrong_api_key_is_a_502_without_replay_and_without_the_key(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    only(cloud, api_keys={"another-key"})
    gw = await make_gateway(use({"type": "api_key", "key": GW_KEY}))
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_auth_rejected"
    assert "ModelArts.81003" in error["message"]
    assert cloud.modelarts.unauthorized == 1  # a fixed key is not retried
    assert_no_secrets(body, log_text(captured_logs))


@pytest.mark.parametrize("stream", [False, True])
async def test_app_code_is_sent_as_x_apig_appcode(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool
) -> None:
    only(cloud, app_codes={APP_CODE})
    gw = await make_gateway(use({"type": "app_code", "code": APP_CODE}))
    status, _ = await chat(http, gw.url, stream=stream, headers=CLIENT_CREDENTIALS)
    assert status == 200
    seen = cloud.modelarts.requests[-1].headers
    assert seen["X-Apig-AppCode"] == APP_CODE
    assert "Authorization" not in seen and "X-Auth-Token" not in seen
    assert cloud.modelarts.authenticated == ["app_code"]


async def test_wrong_app_code_is_refused_with_apig_0303(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    only(cloud, app_codes={"the-right-code"})
    gw = await make_gateway(use({"type": "app_code", "code": APP_CODE}))
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502
    assert "APIG.0303" in json.loads(body)["error"]["message"]
    assert_no_secrets(body)


@pytest.mark.parametrize("stream", [False, True])
async def test_aksk_signature_is_accepted_by_the_independent_verifier(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool
) -> None:
    only(cloud, aksk={AK: SK})
    gw = await make_gateway(use({"type": "aksk", "ak": AK, "sk": SK}))
    status, body = await chat(http, gw.url, stream=stream, headers=CLIENT_CREDENTIALS)
    assert status == 200, body
    assert body.endswith(b"data: [DONE]\n\n") if stream else b"chat.completion" in body
    seen = cloud.modelarts.requests[-1].headers
    assert seen["Authorization"].startswith(
        f"SDK-HMAC-SHA256 Access={AK}, SignedHeaders=content-type;host;x-sdk-date, Signature="
    )
    assert seen["X-Sdk-Date"] != CLIENT_CREDENTIALS["X-Sdk-Date"]
    assert "X-Security-Token" not in seen and "X-Auth-Token" not in seen
    assert cloud.modelarts.authenticated == ["aksk"]


async def test_aksk_signs_odd_queries_and_paths_exactly_as_sent(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # the service path carries a space, non-ASCII, "~", "+", "=" and ":"
    service = FakeModelArts(service_id="café svc~1+a=b:c", aksk={AK: SK})
    runner, url = await serve_on_loopback(service.app)
    try:

        def edit(config: dict[str, Any]) -> None:
            use({"type": "aksk", "ak": AK, "sk": SK})(config)
            config["routes"][0]["upstream"] = url + service.base_path

        gw = await make_gateway(edit)
        query = "b=2&a=1&a=0&q=a+b&u=%E4%B8%AD&flag&e=&t=~x%2Fy"
        for path in ("/v1/chat/completions", "/v1/sse"):
            async with http.post(
                f"{gw.url}{path}?{query}", data=json.dumps(chat_body(False)).encode()
            ) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await runner.cleanup()
    sent = service.requests[-1]
    assert sent.path == "/v1/infers/café svc~1+a=b:c/v1/sse"
    assert "SignedHeaders=content-type;host;x-sdk-date," in sent.headers["Authorization"]
    assert service.authenticated == ["aksk", "aksk"]


async def test_aksk_with_security_token_sends_and_signs_it(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    only(cloud, aksk={AK: SK}, security_tokens={AK: SECURITY_TOKEN})
    cred = {"type": "aksk", "ak": AK, "sk": SK, "security_token": SECURITY_TOKEN}
    gw = await make_gateway(use(cred))
    status, _ = await chat(http, gw.url, stream=True, headers=CLIENT_CREDENTIALS)
    assert status == 200
    seen = cloud.modelarts.requests[-1].headers
    assert seen["X-Security-Token"] == SECURITY_TOKEN
    assert "x-sdk-date;x-security-token, Signature=" in seen["Authorization"]


async def test_temporary_ak_without_its_security_token_is_refused(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    only(cloud, aksk={AK: SK}, security_tokens={AK: SECURITY_TOKEN})
    gw = await make_gateway(use({"type": "aksk", "ak": AK, "sk": SK}))
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502 and "APIG.0301" in json.loads(body)["error"]["message"]


async def test_wrong_sk_is_refused_and_nothing_secret_leaks(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    only(cloud, aksk={AK: "the-real-secret"}, security_tokens={})
    cred = {"type": "aksk", "ak": AK, "sk": SK, "security_token": SECURITY_TOKEN}
    gw = await make_gateway(use(cred))
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "upstream_auth_rejected"
    assert "APIG.0301" in error["message"]
    assert cloud.modelarts.unauthorized == 1  # signing again cannot help: no replay
    # APIG's own refusal quotes the signed headers, security token included: it must stay there
    assert "canonicalRequest" not in body.decode()
    assert_no_secrets(body, log_text(captured_logs))


async def test_skewed_clock_is_refused_with_a_hint(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    only(cloud, app_aksk={APP_KEY: APP_SECRET}, clock=lambda: time.time() + 16 * 60)
    gw = await make_gateway(use({"type": "app_aksk", "app_key": APP_KEY, "app_secret": APP_SECRET}))
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502
    message = json.loads(body)["error"]["message"]
    assert "APIG.0303" in message and "clock" in message


async def test_skew_within_fifteen_minutes_is_accepted(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    only(cloud, aksk={AK: SK}, clock=lambda: time.time() - 14 * 60)
    gw = await make_gateway(use({"type": "aksk", "ak": AK, "sk": SK}))
    status, _ = await chat(http, gw.url, stream=False)
    assert status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_app_aksk_signs_with_the_app_secret(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool
) -> None:
    only(cloud, app_aksk={APP_KEY: APP_SECRET})
    gw = await make_gateway(use({"type": "app_aksk", "app_key": APP_KEY, "app_secret": APP_SECRET}))
    status, body = await chat(http, gw.url, stream=stream, headers=CLIENT_CREDENTIALS)
    assert status == 200, body
    assert (
        cloud.modelarts.requests[-1]
        .headers["Authorization"]
        .startswith(f"SDK-HMAC-SHA256 Access={APP_KEY}, ")
    )
    assert cloud.modelarts.authenticated == ["app_aksk"]


# --- agency -------------------------------------------------------------------------------------


def route_to(credential: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["credential"] = credential

    return edit


@pytest.mark.parametrize("stream", [False, True])
async def test_agency_token_via_a_password_credential(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, stream: bool
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["other"] = agency(cloud)
        route_to("other")(config)

    gw = await make_gateway(edit)
    for _ in range(3):
        status, _ = await chat(http, gw.url, stream=stream)
        assert status == 200
    methods = [r["auth"]["identity"]["methods"] for r in cloud.iam.requests]
    assert sorted(methods) == [["assume_role"], ["password"]]  # one of each, then cached
    role = next(
        r for r in cloud.iam.requests if r["auth"]["identity"]["methods"] == ["assume_role"]
    )
    assert role["auth"]["identity"]["assume_role"] == {
        "agency_name": "modelarts-agency",
        "domain_name": "other-account",
    }
    assert role["auth"]["scope"] == {"project": {"name": "cn-southwest-2"}}
    token = cloud.modelarts.requests[-1].headers["X-Auth-Token"]
    assert cloud.iam.is_valid(token)


async def test_agency_via_a_static_token_and_by_domain_id(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        cloud.iam_url + "/v3/auth/tokens",
        json={
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": cloud.iam.user,
                            "password": cloud.iam.password,
                            "domain": {"name": cloud.iam.domain},
                        }
                    },
                },
                "scope": {"project": {"name": "cn-southwest-2"}},
            }
        },
    ) as resp:
        caller = resp.headers["X-Subject-Token"]
    from gateway.testing.common import stable_id

    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["fixed"] = {"type": "token", "token": caller}
        other = agency(cloud, via="fixed", domain_id=stable_id("domain", "other-account"))
        del other["domain_name"]
        config["credentials"]["other"] = other
        route_to("other")(config)

    gw = await make_gateway(edit)
    status, _ = await chat(http, gw.url, stream=True)
    assert status == 200
    assert cloud.iam.calls == 3  # ours above, the gateway's password prefetch, one assume_role


async def test_agency_renews_a_via_token_that_died_early(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["other"] = agency(cloud)
        route_to("other")(config)

    gw = await make_gateway(edit)
    assert (await chat(http, gw.url, stream=False))[0] == 200
    cloud.iam.revoke_all()  # a password change: every token dies before expires_at
    assert (await chat(http, gw.url, stream=False))[0] == 200  # 401 → new via token → new agency
    methods = [r["auth"]["identity"]["methods"][0] for r in cloud.iam.requests]
    assert methods.count("password") == 2


# --- config -------------------------------------------------------------------------------------


def config_with(cloud: FakeCloud, **credentials: dict[str, Any]) -> dict[str, Any]:
    from conftest import base_config

    config = base_config(cloud)
    config["credentials"].update(credentials)
    return config


def problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(config, {})
    return info.value.problems


def test_agency_via_must_yield_a_token(cloud: FakeCloud) -> None:
    config = config_with(
        cloud,
        key={"type": "api_key", "key": "k"},
        a=agency(cloud, via="key"),
        b=agency(cloud, via="nobody"),
        c=agency(cloud, via="c"),
        d=agency(cloud, via="e"),
        e=agency(cloud, via="d"),
    )
    found = problems(config)
    assert any(
        p.startswith("credentials.a.via: credential 'key' has type 'api_key'") for p in found
    )
    assert any(p.startswith("credentials.b.via: no credential named 'nobody'") for p in found)
    assert any(p.startswith("credentials.c.via: must name another credential") for p in found)
    assert "credentials.d.via: agencies form a loop (d -> e -> d)" in found


def test_agency_needs_a_domain_and_an_agency_name(cloud: FakeCloud) -> None:
    bad = agency(cloud)
    del bad["domain_name"], bad["agency_name"]
    found = problems(config_with(cloud, other=bad))
    assert (
        "credentials.other.domain_name: is required (the delegating account's name, or domain_id)"
        in found
    )
    assert "credentials.other.agency_name: is required" in found


def test_region_alone_implies_iam_url_and_project(cloud: FakeCloud) -> None:
    config = config_with(cloud)
    main = config["credentials"]["main"]
    del main["iam_url"], main["project"]
    main["region"] = "ap-southeast-1"
    config["credentials"]["other"] = {
        "type": "agency",
        "via": "main",
        "region": "cn-southwest-2",
        "domain_name": "x",
        "agency_name": "y",
    }
    settings = parse_settings(config, {})
    cred = settings.credentials["main"]
    assert str(cred.iam_url) == "https://iam.ap-southeast-1.myhuaweicloud.com"  # type: ignore[union-attr]
    assert cred.project == "ap-southeast-1"  # type: ignore[union-attr]
    other = settings.credentials["other"]
    assert str(other.iam_url) == "https://iam.cn-southwest-2.myhuaweicloud.com"  # type: ignore[union-attr]
    assert other.project == "cn-southwest-2"  # type: ignore[union-attr]


def test_explicit_keys_win_over_region(cloud: FakeCloud) -> None:
    config = config_with(cloud)
    main = config["credentials"]["main"]
    main["region"] = "ap-southeast-1"
    del main["project"]
    main["project_id"] = "0123"
    cred = parse_settings(config, {}).credentials["main"]
    assert str(cred.iam_url) == cloud.iam_url  # type: ignore[union-attr]
    assert (cred.project, cred.project_id) == (None, "0123")  # type: ignore[union-attr]


def test_bad_region_and_missing_project_are_named(cloud: FakeCloud) -> None:
    config = config_with(cloud)
    main = config["credentials"]["main"]
    main["region"] = "Southwest 2"
    del main["project"], main["iam_url"]
    found = problems(config)
    assert any(p.startswith("credentials.main.region: not a region id") for p in found)
    assert any(p.startswith("credentials.main.iam_url: is required") for p in found)


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        ({"type": "token"}, "credentials.x.token: is required (or token_file)"),
        (
            {"type": "token", "token": "t", "token_file": "/tmp/t"},
            "credentials.x.token: give either token or token_file, not both",
        ),
        ({"type": "api_key"}, "credentials.x.key: is required"),
        ({"type": "app_code", "code": ""}, "credentials.x.code: must not be empty"),
        ({"type": "aksk", "ak": "a"}, "credentials.x.sk: is required"),
        (
            {"type": "aksk", "ak": "a", "sk": "s", "security_token": ""},
            "credentials.x.security_token: must not be empty (leave it out for permanent keys)",
        ),
        ({"type": "app_aksk", "app_key": "k"}, "credentials.x.app_secret: is required"),
        ({"type": "api_key", "key": "k", "token": "t"}, "credentials.x.token: unknown key"),
    ],
)
def test_credential_keys_are_validated(
    cloud: FakeCloud, credential: dict[str, Any], expected: str
) -> None:
    assert expected in problems(config_with(cloud, x=credential))


def test_secrets_never_show_in_settings_repr(cloud: FakeCloud) -> None:
    config = config_with(
        cloud,
        k={"type": "api_key", "key": GW_KEY},
        c={"type": "app_code", "code": APP_CODE},
        s={"type": "aksk", "ak": AK, "sk": SK, "security_token": SECURITY_TOKEN},
        a={"type": "app_aksk", "app_key": APP_KEY, "app_secret": APP_SECRET},
    )
    assert_no_secrets(repr(parse_settings(config, {})))


# --- no secret anywhere ---------------------------------------------------------------------------

TOKEN_PREFIX = "MIIatAYJKoZIhvcNAQcCoII"  # every token the fake IAM issues starts so


@pytest.mark.parametrize(
    ("accept", "refuse", "credential"),
    [
        ({"api_keys": {GW_KEY}}, {"api_keys": {"x"}}, {"type": "api_key", "key": GW_KEY}),
        ({"app_codes": {APP_CODE}}, {"app_codes": {"x"}}, {"type": "app_code", "code": APP_CODE}),
        (
            {"aksk": {AK: SK}, "security_tokens": {AK: SECURITY_TOKEN}},
            {"aksk": {AK: "x"}},
            {"type": "aksk", "ak": AK, "sk": SK, "security_token": SECURITY_TOKEN},
        ),
        (
            {"app_aksk": {APP_KEY: APP_SECRET}},
            {"app_aksk": {APP_KEY: "x"}},
            {"type": "app_aksk", "app_key": APP_KEY, "app_secret": APP_SECRET},
        ),
    ],
)
async def test_no_secret_in_logs_or_bodies_for_any_mode(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
    accept: dict[str, Any],
    refuse: dict[str, Any],
    credential: dict[str, Any],
) -> None:
    only(cloud, **accept)
    gw = await make_gateway(use(credential))
    bodies = []
    for stream in (False, True):
        status, body = await chat(http, gw.url, stream=stream, headers=CLIENT_CREDENTIALS)
        assert status == 200
        bodies.append(body)
    only(cloud, **refuse)
    status, body = await chat(http, gw.url, stream=False)
    assert status == 502
    bodies.append(body)
    logs = log_text(captured_logs)
    assert "access" in logs  # the access log did run at DEBUG
    assert_no_secrets(logs, *bodies)
    for value in CLIENT_CREDENTIALS.values():
        assert value not in logs


async def test_no_token_in_logs_or_bodies_for_password_and_agency(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["other"] = agency(cloud)
        config["routes"].append(
            {
                "name": "other",
                "path": "/v1",
                "models": ["via-agency"],
                "upstream": cloud.service_url,
                "credential": "other",
            }
        )

    gw = await make_gateway(edit)
    for model in ("qwen2-7b", "via-agency"):
        body_json = chat_body(True, model=model)
        async with http.post(gw.url + "/v1/chat/completions", json=body_json) as resp:
            assert resp.status == 200
            assert TOKEN_PREFIX.encode() not in await resp.read()
    assert cloud.iam.calls == 2
    cloud.iam.revoke_all()
    cloud.iam.failures = [401, 401, 401]
    body_json = chat_body(False, model="via-agency")
    async with http.post(gw.url + "/v1/chat/completions", json=body_json) as resp:
        assert resp.status == 502
        body = await resp.text()
    logs = log_text(captured_logs)
    assert TOKEN_PREFIX not in logs and TOKEN_PREFIX not in body
    assert cloud.iam.password not in logs and cloud.iam.password not in body
