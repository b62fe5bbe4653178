"""``type: workload_identity``: a projected service-account token becomes a project token.

End to end: the gateway reads the token file, exchanges it at the fake IAM's
``/v3.0/OS-AUTH/id-token/tokens`` (which verifies the JWT like IAM verifies a cluster's
tokens), and calls the fake ModelArts with the project token; streaming and not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ROOT, GatewayFactory, RunningGateway, agency, chat_body, start_gateway

from gateway.config.load import ConfigError, parse_settings
from gateway.config.model import WorkloadIdentityCredential
from gateway.credentials.token_cache import TokenCache
from gateway.credentials.workload_identity import without_id_token
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud, OidcProvider

DAY = 86400.0


class ProjectedToken:
    """A projected service-account token volume as the kubelet keeps it: ``token`` is a symlink
    into ``..data``, itself a symlink to a timestamped directory swapped atomically on rotation
    (Kubernetes AtomicWriter)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "token"
        self.generation = 0

    def write(self, content: str) -> None:
        self.generation += 1
        target = self.root / f"..{self.generation}"
        target.mkdir()
        (target / "token").write_text(content)
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/token")


@pytest.fixture
def projected(cloud: FakeCloud, tmp_path: Path) -> ProjectedToken:
    volume = ProjectedToken(tmp_path)
    volume.write(cloud.iam.provider.mint())
    return volume


def use_wi(cloud: FakeCloud, token_file: Path | str, **extra: Any) -> Any:
    """An ``edit`` for make_gateway: route ``chat`` through a workload_identity credential."""

    def edit(config: dict[str, Any]) -> None:
        # only this credential: the password one would fetch a token of its own at start
        config["credentials"] = {"wi": {**cloud.workload_identity_config(str(token_file)), **extra}}
        config["routes"][0]["credential"] = "wi"

    return edit


def cache_of(gw: RunningGateway) -> TokenCache:
    cache = gw.app[GATEWAY].credentials["wi"].cache  # type: ignore[attr-defined]
    assert isinstance(cache, TokenCache)
    return cache


def watch_refreshes(cache: TokenCache) -> asyncio.Queue[str]:
    results: asyncio.Queue[str] = asyncio.Queue()
    original = cache._on_refresh

    def listener(name: str, result: str, expires_at: float | None) -> None:
        if original is not None:
            original(name, result, expires_at)
        results.put_nowait(result)

    cache._on_refresh = listener
    return results


def shift_clock(cache: TokenCache, offset: float) -> None:
    cache._now = lambda: time.time() + offset


async def chat(
    http: aiohttp.ClientSession, gw: RunningGateway, stream: bool = False
) -> tuple[int, bytes]:
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(stream=stream)) as resp:
        return resp.status, await resp.read()


def tokens_seen(cloud: FakeCloud) -> list[str]:
    return [r.headers.get("X-Auth-Token", "") for r in cloud.modelarts.requests]


async def test_token_file_is_exchanged_for_a_project_token_streaming_and_not(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    gw = await make_gateway(use_wi(cloud, projected.path))
    status, body = await chat(http, gw)
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    status, body = await chat(http, gw, stream=True)
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")

    assert cloud.iam.calls == 1  # one token served both requests
    sent = cloud.iam.id_token_requests[0]
    assert sent.idp_id == "cce-oidc"
    assert sent.id_token == projected.path.read_text()
    assert sent.scope == {"project": {"name": "cn-southwest-2"}}
    assert cloud.iam.requests[0] == {
        "auth": {"id_token": {"id": "***"}, "scope": {"project": {"name": "cn-southwest-2"}}}
    }
    seen = tokens_seen(cloud)
    assert len(seen) == 2 and seen[0] == seen[1] and cloud.iam.is_valid(seen[0])
    assert cloud.modelarts.unauthorized == 0
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="ok") == 1
    expiry = gw.metric("gateway_token_expiry_timestamp_seconds", credential="wi")
    assert time.time() + DAY - 60 < expiry <= time.time() + DAY


async def test_concurrent_requests_share_one_exchange(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text(cloud.iam.provider.mint())
    cloud.iam.delay = 0.3  # every request arrives while the one exchange is under way
    gw = await make_gateway(use_wi(cloud, path))
    results = await asyncio.gather(*(chat(http, gw, stream=i % 2 == 0) for i in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert cloud.iam.calls == 1
    assert len(set(tokens_seen(cloud))) == 1


async def test_project_id_scopes_the_token_by_id(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    project_id = cloud.iam.projects["cn-southwest-2"]
    edit = use_wi(cloud, projected.path)

    def by_id(config: dict[str, Any]) -> None:
        edit(config)
        del config["credentials"]["wi"]["project"]
        config["credentials"]["wi"]["project_id"] = project_id

    gw = await make_gateway(by_id)
    assert (await chat(http, gw))[0] == 200
    assert cloud.iam.id_token_requests[0].scope == {"project": {"id": project_id}}


async def test_refresh_ahead_of_expiry_serves_the_old_token_meanwhile(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    gw = await make_gateway(use_wi(cloud, projected.path))
    assert (await chat(http, gw))[0] == 200
    old = tokens_seen(cloud)[-1]
    cache = cache_of(gw)
    refreshes = watch_refreshes(cache)
    shift_clock(cache, DAY - 100)  # inside refresh_margin (300 s), still valid
    cloud.iam.delay = 0.5
    assert (await chat(http, gw, stream=True))[0] == 200
    assert tokens_seen(cloud)[-1] == old  # answered at once with the old token
    assert refreshes.empty()
    assert await asyncio.wait_for(refreshes.get(), 3) == "ok"
    shift_clock(cache, 0)
    assert (await chat(http, gw))[0] == 200
    assert tokens_seen(cloud)[-1] != old
    assert cloud.iam.calls == 2
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="ok") == 2


async def test_the_token_is_refreshed_before_it_expires_with_no_request_at_all(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    """An idle sidecar still exchanges the rotated file for a new token inside the margin."""
    cloud.iam.token_lifetime = 5.5  # real seconds: the refresh is due 1.5 s after each fetch
    gw = await make_gateway(use_wi(cloud, projected.path, refresh_margin="4s"))
    credential = gw.app[GATEWAY].credentials["wi"]
    first = await credential.token()  # type: ignore[attr-defined]
    refreshes = watch_refreshes(cache_of(gw))
    projected.write(cloud.iam.provider.mint())  # the kubelet rotates the file meanwhile
    assert await asyncio.wait_for(refreshes.get(), 5) == "ok"
    renewed = cache_of(gw).usable()
    assert renewed is not None and renewed.value != first.value
    assert time.time() < first.expires_at  # before the old token expired
    assert cloud.iam.id_token_requests[-1].id_token == projected.path.read_text()
    assert not cloud.modelarts.requests  # no request woke it
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 200


async def test_rotated_token_file_is_read_at_the_next_fetch(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    gw = await make_gateway(use_wi(cloud, projected.path))
    assert (await chat(http, gw))[0] == 200
    first = cloud.iam.id_token_requests[-1].id_token

    # the kubelet rotates the token; the IAM token still serves, so IAM is not asked
    projected.write(cloud.iam.provider.mint())
    assert (await chat(http, gw))[0] == 200
    assert cloud.iam.calls == 1

    # the IAM token dies early (e.g. the identity provider's rules changed): the 401 is
    # replayed once with a token fetched with the rotated file's content
    cloud.iam.revoke_all()
    status, body = await chat(http, gw, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert cloud.modelarts.unauthorized == 1
    second = cloud.iam.id_token_requests[-1].id_token
    assert second == projected.path.read_text() != first

    # and at expiry, again the file's current content
    projected.write(cloud.iam.provider.mint())
    shift_clock(cache_of(gw), 2 * DAY)
    assert (await chat(http, gw))[0] == 200
    assert cloud.iam.id_token_requests[-1].id_token == projected.path.read_text() != second
    assert cloud.iam.calls == 3


async def test_iam_failure_gives_502_and_backs_off(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    cloud.iam.failures = [503]
    gw = await make_gateway(use_wi(cloud, projected.path))
    status, raw = await chat(http, gw, stream=True)
    assert status == 502
    error = json.loads(raw)["error"]
    assert error["code"] == "credential_unavailable"
    assert "'wi'" in error["message"]
    assert "HTTP 503" in error["message"]
    assert projected.path.read_text().encode() not in raw
    assert cloud.iam.calls == 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    status, raw = await chat(http, gw)
    assert status == 502
    assert json.loads(raw)["error"]["code"] == "credential_unavailable"
    assert loop.time() - start < 0.5
    assert cloud.iam.calls == 1  # inside the back-off window: IAM is not asked again
    assert not cloud.modelarts.requests
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="error") == 1


async def test_an_iam_message_quoting_the_id_token_is_passed_on_without_it(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    """IAM's error texts are not documented: a hostile IAM quotes the id token in its 401."""
    cloud.iam.echo_id_token = True
    stranger = cloud.iam.provider.mint("system:serviceaccount:other:intruder")
    path = tmp_path / "token"
    path.write_text(stranger)
    gw = await make_gateway(use_wi(cloud, path))
    status, raw = await chat(http, gw)
    assert status == 502
    async with http.get(gw.url + "/readyz") as resp:
        ready = await resp.text()
    logs = "\n".join(r.getMessage() for r in captured_logs.records)
    message = json.loads(raw)["error"]["message"]
    assert "IAM refused the identity (HTTP 401: Authentication failed (id_token ***" in message
    pieces = {stranger[i : i + 16] for i in range(len(stranger) - 15)}
    for text in (raw.decode(), ready, logs):
        assert "id_token ***" in text
        assert not any(piece in text for piece in pieces)


@pytest.mark.parametrize(
    "quoted",
    ["{t}", "id_token={t}", "token_{t}x", "'{t}'", "{t_head}", "...{t_cut}"],
)
def test_any_quoted_piece_of_the_id_token_is_hidden(cloud: FakeCloud, quoted: str) -> None:
    token = cloud.iam.provider.mint()
    text = "IAM says: " + quoted.format(t=token, t_head=token[:40], t_cut=token[30:70]) + " bad."
    shown = without_id_token(text, token)
    assert shown.startswith("IAM says: ") and shown.endswith(" bad.") and "***" in shown
    assert not any(token[i : i + 16] in shown for i in range(len(token) - 15))
    assert without_id_token("no identity conversion rule matches", token) == (
        "no identity conversion rule matches"
    )


async def test_rejected_id_token_is_never_retried_in_a_loop(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # a token for a service account no identity conversion rule maps
    stranger = cloud.iam.provider.mint("system:serviceaccount:other:intruder")
    path = tmp_path / "token"
    path.write_text(stranger)
    gw = await make_gateway(use_wi(cloud, path))
    for _ in range(6):
        status, raw = await chat(http, gw)
        assert status == 502
        assert stranger.encode() not in raw
        assert json.loads(raw)["error"]["code"] == "credential_unavailable"
    assert cloud.iam.calls == 1
    assert not cloud.modelarts.requests
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="rejected") == 1
    assert cache_of(gw)._timer is None  # nor retried unasked: only a request tries again
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 503
        problems = (await resp.json())["problems"]
    assert "IAM refused the identity (HTTP 401" in problems[0]
    assert "identity conversion rule" in problems[0]  # IAM's reason, passed on


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read token_file {path} (No such file or directory)"),
        ("", "token_file {path} is empty"),
        ("\n  \n", "token_file {path} is empty"),
        ("eyJ0 eyJ1", "token_file {path} must hold one token"),
    ],
    ids=["missing", "empty", "blank", "two-words"],
)
async def test_unusable_token_file_is_an_error_naming_the_path(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    content: str | None,
    problem: str,
) -> None:
    path = tmp_path / "secrets" / "token"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    gw = await make_gateway(use_wi(cloud, path))
    status, raw = await chat(http, gw, stream=True)
    assert status == 502
    message = json.loads(raw)["error"]["message"]
    assert problem.format(path=path) in message
    assert "'wi'" in message
    if content and content.strip():
        assert content.strip().encode() not in raw
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 503
        assert problem.format(path=path) in (await resp.json())["problems"][0]
    assert cloud.iam.calls == 0  # nothing worth sending


async def test_the_file_appearing_later_is_picked_up_after_the_back_off(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    gw = await make_gateway(use_wi(cloud, path))
    assert (await chat(http, gw))[0] == 502
    path.write_text(cloud.iam.provider.mint())
    cache = cache_of(gw)
    cache._retry_at = 0.0  # the first back-off (1 s) has passed
    assert (await chat(http, gw))[0] == 200
    assert cloud.iam.calls == 1


async def test_no_secret_in_any_log_line_or_error_body(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    id_tokens = [projected.path.read_text()]
    gw = await make_gateway(use_wi(cloud, projected.path))
    bodies = [(await chat(http, gw))[1], (await chat(http, gw, stream=True))[1]]
    projected.write(cloud.iam.provider.mint())
    id_tokens.append(projected.path.read_text())
    cloud.iam.revoke_all()
    bodies.append((await chat(http, gw))[1])  # 401 replay with a token from the rotated file
    cloud.iam.failures = [500]
    shift_clock(cache_of(gw), 2 * DAY)
    bodies.append((await chat(http, gw, stream=True))[1])  # IAM down, token expired: 502
    async with http.get(gw.url + "/readyz") as resp:
        bodies.append(await resp.read())
    async with http.get(gw.url + "/metrics") as resp:
        bodies.append(await resp.read())
    iam_tokens = set(tokens_seen(cloud))
    assert len(iam_tokens) == 2
    assert b"credential_unavailable" in bodies[3]
    text = "\n".join(
        logging.Formatter("%(name)s %(levelname)s %(message)s").format(r)
        for r in captured_logs.records
    )
    assert "credential 'wi': new token" in text
    for secret in [*id_tokens, *iam_tokens]:
        assert secret not in text
        for body in bodies:
            assert secret.encode() not in body
        # not even a prefix long enough to matter (a JWT header is shared: skip it)
        assert secret.split(".")[-1][:24] not in text


async def test_an_agency_can_use_workload_identity_as_via(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    projected: ProjectedToken,
) -> None:
    edit = use_wi(cloud, projected.path)

    def via_wi(config: dict[str, Any]) -> None:
        edit(config)
        config["credentials"]["other"] = agency(cloud, via="wi")
        config["routes"][0]["credential"] = "other"

    gw = await make_gateway(via_wi)
    assert (await chat(http, gw))[0] == 200
    assert len(cloud.iam.id_token_requests) == 1
    assert cloud.iam.calls == 2  # the id-token exchange, then assume_role with its token


async def test_sidecar_manifest_works_with_iam_set_up_as_its_comments_say(
    cloud: FakeCloud, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """deploy/kubernetes/sidecar-workload-identity.yaml: its config, audience and service
    account, against an IAM identity provider configured as the manifest's comments describe."""
    docs = list(
        yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar-workload-identity.yaml").read_text())
    )
    (configmap,) = (d for d in docs if d["kind"] == "ConfigMap")
    (account,) = (d for d in docs if d["kind"] == "ServiceAccount")
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "projected" in v)
    audience = volume["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    subject = f"system:serviceaccount:default:{account['metadata']['name']}"
    provider = OidcProvider(idp_id="my-cluster", client_id=audience, subjects=(subject,))
    cloud.iam.providers = {provider.idp_id: provider}
    token_file = tmp_path / "oidc-token"
    token_file.write_text(provider.mint(subject))

    config = yaml.safe_load(configmap["data"]["config.yaml"])
    config["listen"]["port"] = 0
    credential = config["credentials"]["main"]
    assert credential["region"] == "cn-southwest-2"
    credential["iam_url"] = cloud.iam_url  # the region's IAM, here the fake
    credential["token_file"] = str(token_file)
    environ = {"HWC_IDP_ID": provider.idp_id, "MODELARTS_SERVICE_URL": cloud.service_url}
    gw = await start_gateway(parse_settings(config, environ))
    try:
        for stream in (False, True):
            async with http.post(
                gw.url + "/v1/chat/completions", json=chat_body(stream=stream)
            ) as resp:
                assert resp.status == 200
        assert cloud.iam.id_token_requests[0].scope == {"project": {"name": "cn-southwest-2"}}
        assert cloud.iam.calls == 1
    finally:
        await gw.runner.cleanup()


# --- the fake IAM's id-token endpoint: it must refuse what real IAM refuses ------------------


async def exchange(
    http: aiohttp.ClientSession,
    cloud: FakeCloud,
    id_token: str,
    idp_id: str | None = "cce-oidc",
    scope: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any], str]:
    headers = {"X-Idp-Id": idp_id} if idp_id is not None else {}
    auth: dict[str, Any] = {"id_token": {"id": id_token}}
    if scope is not None:
        auth["scope"] = scope
    async with http.post(
        cloud.iam_url + "/v3.0/OS-AUTH/id-token/tokens", json={"auth": auth}, headers=headers
    ) as resp:
        return resp.status, await resp.json(), resp.headers.get("X-Subject-Token", "")


async def test_fake_refuses_tokens_the_identity_provider_would_not_accept(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    provider = cloud.iam.provider
    good = provider.mint()
    header, claims, signature = good.split(".")
    cases = {
        "signature does not verify": provider.mint(key=b"another cluster's key"),
        "has expired": provider.mint(lifetime=-1),
        "audience does not match": provider.mint(audience="sts.example.com"),
        "issuer does not match": provider.mint(issuer="https://evil.example.com"),
        "identity conversion rule": provider.mint("system:serviceaccount:kube-system:default"),
        "not a JWT": "not-a-jwt",
        "signature does not verify ": f"{header}.{claims}.{signature[::-1]}",
    }
    scope = {"project": {"name": "cn-southwest-2"}}
    for reason, token in cases.items():
        status, body, subject = await exchange(http, cloud, token, scope=scope)
        assert status == 401, reason
        assert reason.strip() in body["error_msg"] and body["error_code"].startswith("IAM.")
        assert subject == ""
    assert (await exchange(http, cloud, good, idp_id=None, scope=scope))[0] == 400
    assert (await exchange(http, cloud, good, idp_id="other-idp", scope=scope))[0] == 404
    status, body, _ = await exchange(http, cloud, good, scope={"project": {"name": "nowhere"}})
    assert status == 401
    status, body, subject = await exchange(http, cloud, good, scope=scope)
    assert status == 201 and cloud.iam.is_valid(subject)
    token = body["token"]
    assert token["methods"] == ["mapped"]
    assert token["project"]["name"] == "cn-southwest-2"
    assert token["user"]["OS-FEDERATION"]["identity_provider"] == {"id": "cce-oidc"}


async def test_fake_unscoped_token_cannot_call_a_service(
    cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    """No scope: an unscoped token (what the SDK asks for before exchanging it for AK/SK)."""
    status, body, subject = await exchange(http, cloud, cloud.iam.provider.mint())
    assert status == 201 and subject
    assert "project" not in body["token"] and "catalog" not in body["token"]
    assert not cloud.iam.is_valid(subject)  # "unscoped tokens cannot be used for authentication"


# --- config ---------------------------------------------------------------------------------


def wi_settings(credential: dict[str, Any]) -> Any:
    return parse_settings(
        {
            "credentials": {"wi": credential},
            "routes": [{"name": "r", "upstream": "https://example.com", "credential": "wi"}],
        },
        {},
    )


def test_region_implies_iam_url_and_project() -> None:
    settings = wi_settings(
        {
            "type": "workload_identity",
            "region": "cn-southwest-2",
            "idp_id": "cce-oidc",
            "token_file": "/var/run/secrets/tokens/oidc-token",
        }
    )
    cfg = settings.credentials["wi"]
    assert isinstance(cfg, WorkloadIdentityCredential)
    assert str(cfg.iam_url) == "https://iam.cn-southwest-2.myhuaweicloud.com"
    assert cfg.project == "cn-southwest-2"
    assert str(cfg.token_file) == "/var/run/secrets/tokens/oidc-token"


def test_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        wi_settings({"type": "workload_identity", "iam_url": "https://iam.example.com"})
    problems = err.value.problems
    assert "credentials.wi.idp_id: is required" in problems
    assert any(p.startswith("credentials.wi.token_file: is required") for p in problems)
    assert any(p.startswith("credentials.wi.project: is required") for p in problems)
    with pytest.raises(ConfigError) as err:
        wi_settings(
            {
                "type": "workload_identity",
                "region": "cn-southwest-2",
                "idp_id": "x",
                "token_file": "",
                "password": "p",
            }
        )
    assert "credentials.wi.token_file: must not be empty" in err.value.problems
    assert "credentials.wi.password: unknown key" in err.value.problems
    with pytest.raises(ConfigError) as err:
        wi_settings(
            {
                "type": "workload_identity",
                "region": "cn-southwest-2",
                "idp_id": "cce\r\nX-Evil: 1",
                "token_file": "/t",
            }
        )
    assert err.value.problems == [
        "credentials.wi.idp_id: must be an identity provider name (no spaces or control characters)"
    ]
