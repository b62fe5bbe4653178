"""The fakes and the gateway held against huaweicloudsdkcore (issue 12, item 3): the SDK's own
metadata and pod identity accessors, run against the same fake services, obtain the keys the
gateway obtains with the same requests; its environment and profile-file providers and its
chain agree with the gateway's lookups on the same inputs.

The SDK is synchronous (``requests``): it runs on a worker thread while the fakes serve on the
test's loop. Its metadata endpoint is a class constant, patched to the loopback fake, so no test
can reach 169.254.169.254.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from huaweicloudsdkcore.auth.internal import MetadataAccessor, PodIdentityAccessor, StsAccessor
from huaweicloudsdkcore.auth.provider import (
    CredentialProviderChain,
    EnvCredentialProvider,
    OidcStsCredentialProvider,
    ProfileCredentialProvider,
)
from huaweicloudsdkcore.exceptions.exceptions import ApiValueError
from yarl import URL

from gateway.config import sdk_env
from gateway.config.load import parse_settings
from gateway.config.model import SdkDefaultCredential
from gateway.credentials.key_services import (
    MetadataService,
    PodIdentityService,
    TemporaryKeys,
    parse_answer,
)
from gateway.credentials.temporary_aksk import SdkChain
from gateway.credentials.token_cache import FetchFailed
from gateway.testing.metadata import Platform, start_platform
from gateway.testing.modelarts import FakeModelArts

POD_TOKEN = "pod-identity-token-for-the-sdk-crosscheck"
# Every variable either side reads: cleared before each test, so the machine's own do not count.
SDK_VARIABLES = (
    sdk_env.ENV_AK,
    sdk_env.ENV_SK,
    sdk_env.ENV_SECURITY_TOKEN,
    sdk_env.ENV_IDP_ID,
    sdk_env.ENV_ID_TOKEN_FILE,
    sdk_env.ENV_CREDENTIALS_FILE,
    sdk_env.ENV_POD_URI,
    sdk_env.ENV_POD_TOKEN_FILE,
    sdk_env.ENV_OIDC_PROVIDER_URN,
    sdk_env.ENV_OIDC_AGENCY_URN,
    sdk_env.ENV_OIDC_ID_TOKEN,
    sdk_env.ENV_OIDC_TOKEN_FILE,
    "HUAWEICLOUD_SDK_PROJECT_ID",
    "HUAWEICLOUD_SDK_DOMAIN_ID",
    "HOME",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SDK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # never the real ~/.huaweicloud


@pytest.fixture
async def platform(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    fake = await start_platform([FakeModelArts()], POD_TOKEN)
    monkeypatch.setattr(MetadataAccessor, "_METADATA_ENDPOINT", fake.metadata_url)
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "pod-token"
    path.write_text(POD_TOKEN + "\n")
    return path


def same_keys(sdk: Any, ours: TemporaryKeys) -> None:
    """The SDK's Credential equals ours: AK, SK, security token and expiry."""
    assert sdk.access == ours.value
    assert sdk.secret == ours.secret.reveal()
    assert sdk.security_token == (ours.security_token.reveal() if ours.security_token else None)
    # the SDK parses expires_at as local time with time.mktime and compares it with
    # mktime(utcnow()) (time_utils): in its frame the expiry is mktime of the UTC fields
    assert sdk.expire_at == time.mktime(time.gmtime(ours.expires_at))


def shape(requests_seen: list[web.Request]) -> list[tuple[str, str, str, bool]]:
    """What matters in each request: method, path, TTL asked, whether a session token went."""
    return [
        (
            r.method,
            r.path,
            r.headers.get("X-Metadata-Token-Ttl-Seconds", ""),
            "X-Metadata-Token" in r.headers,
        )
        for r in requests_seen
    ]


# --- the metadata service ------------------------------------------------------------------------


@pytest.mark.parametrize("session_tokens", [True, False])
async def test_sdk_metadata_accessor_gets_the_keys_the_gateway_gets_with_the_same_requests(
    platform: Platform, session: aiohttp.ClientSession, session_tokens: bool
) -> None:
    md = platform.metadata
    md.session_tokens = session_tokens
    ours = await MetadataService(URL(platform.metadata_url), session).fetch()
    ours_sent = shape(md.requests)
    md.requests.clear()
    sdk = await asyncio.to_thread(MetadataAccessor().get_credential)
    same_keys(sdk, ours)
    assert shape(md.requests) == ours_sent
    expected_put = ("PUT", "/meta-data/latest/api/token", "21600", False)
    assert ours_sent == [expected_put, ("GET", "/openstack/latest/securitykey", "", session_tokens)]


@pytest.mark.parametrize("status", [404, 405, 503])
async def test_sdk_and_gateway_read_the_same_put_statuses_as_no_session_tokens(
    platform: Platform, session: aiohttp.ClientSession, status: int
) -> None:
    platform.metadata.session_tokens = False
    platform.metadata.no_token_status = status
    ours = await MetadataService(URL(platform.metadata_url), session).fetch()
    sdk = await asyncio.to_thread(MetadataAccessor().get_credential)
    same_keys(sdk, ours)


async def test_sdk_and_gateway_renew_a_stale_session_token_the_same_way(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    md = platform.metadata
    service, accessor = MetadataService(URL(platform.metadata_url), session), MetadataAccessor()
    await service.fetch()
    await asyncio.to_thread(accessor.get_credential)
    md.expire_session_tokens()
    md.requests.clear()
    ours = await service.fetch()
    ours_sent = shape(md.requests)
    md.requests.clear()
    sdk = await asyncio.to_thread(accessor.get_credential)
    same_keys(sdk, ours)
    assert shape(md.requests) == ours_sent
    get = ("GET", "/openstack/latest/securitykey", "", True)
    assert ours_sent == [get, ("PUT", "/meta-data/latest/api/token", "21600", False), get]


async def test_sdk_and_gateway_both_fail_when_no_agency_is_bound(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    platform.metadata.agency = False
    with pytest.raises(FetchFailed, match="no agency is bound"):
        await MetadataService(URL(platform.metadata_url), session).fetch()
    puts = platform.metadata.token_puts
    with pytest.raises(Exception, match="401"):
        await asyncio.to_thread(MetadataAccessor().get_credential)
    assert platform.metadata.token_puts == puts + 1  # neither asks for a second session token


# --- pod identity --------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata_shape", [False, True])
async def test_sdk_pod_identity_accessor_gets_the_keys_the_gateway_gets_with_the_same_request(
    platform: Platform, session: aiohttp.ClientSession, token_file: Path, metadata_shape: bool
) -> None:
    pod = platform.pod_identity
    pod.metadata_shape = metadata_shape
    uri = platform.pod_identity_url
    ours = await PodIdentityService(URL(uri), token_file, session).fetch()
    sdk = await asyncio.to_thread(PodIdentityAccessor(uri, str(token_file)).get_credential)
    same_keys(sdk, ours)
    ours_req, sdk_req = pod.requests
    assert ours_req.method == sdk_req.method == "POST"
    assert ours_req.path == sdk_req.path == URL(uri).path
    assert ours_req.headers["Authorization"] == sdk_req.headers["Authorization"] == POD_TOKEN
    assert ours_req.content_type == sdk_req.content_type == "application/json"
    assert pod.bodies[0] == pod.bodies[1] == b"{}"


async def test_sdk_and_gateway_both_refuse_a_pod_identity_401(
    platform: Platform, session: aiohttp.ClientSession, token_file: Path
) -> None:
    platform.pod_identity.token = "not-this-pod"
    uri = platform.pod_identity_url
    with pytest.raises(FetchFailed, match="HTTP 401"):
        await PodIdentityService(URL(uri), token_file, session).fetch()
    with pytest.raises(Exception, match="401"):
        await asyncio.to_thread(PodIdentityAccessor(uri, str(token_file)).get_credential)


ANSWERS: list[dict[str, Any]] = [
    {"credential": {"access": "A", "secret": "S", "securitytoken": "T", "expires_at": "E"}},
    {"credentials": {"accessKeyId": "A", "secretAccessKey": "S", "securityToken": "T"}},
    {"access_key_id": "A", "secret_access_key": "S", "security_token": "T"},
    {"credential": {"access": "A", "secret": "S", "expiration": "E"}},  # no security token
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_answers_are_read_as_the_sdk_reads_them(answer: dict[str, Any]) -> None:
    inner = answer.get("credential", answer.get("credentials", answer))
    inner.setdefault("expires_at", "2026-12-03T10:11:12.345678Z")
    if inner.get("expiration") == "E":
        inner["expiration"] = inner.pop("expires_at")
    for key, value in list(inner.items()):
        if value == "E":
            inner[key] = "2026-12-03T10:11:12.345678Z"
    ours = parse_answer(json.dumps(answer).encode(), "test")
    sdk = StsAccessor._process_credential(answer)
    same_keys(sdk, ours)


# --- the environment and the profile file --------------------------------------------------------


def sdk_outcome(provider: Callable[[], Any]) -> tuple[str, ...]:
    """("keys", ak, sk, token) | ("next",) the chain moves on | ("other",) a login we refuse /
    the SDK stops."""
    try:
        credentials = provider()
    except ApiValueError:
        return ("next",)
    except Exception:
        return ("other",)
    if getattr(credentials, "idp_id", None) or getattr(credentials, "sts_accessor", None):
        return ("other",)  # federated (idp_id + id_token_file) or OIDC STS
    # an empty HUAWEICLOUD_SDK_SECURITY_TOKEN: the SDK would send an empty header; the gateway
    # sends none (documented difference)
    return ("keys", credentials.ak, credentials.sk, credentials.security_token or "")


def gateway_env_outcome(environ: Mapping[str, str]) -> tuple[str, ...]:
    if sdk_env.unsupported_env(environ):
        return ("other",)
    keys = sdk_env.env_keys(environ)
    if keys is None:
        return ("next",)
    token = keys.security_token.reveal() if keys.security_token else ""
    return ("keys", keys.ak, keys.sk.reveal(), token)


def env_cases() -> Iterator[dict[str, str]]:
    names = (
        sdk_env.ENV_AK,
        sdk_env.ENV_SK,
        sdk_env.ENV_SECURITY_TOKEN,
        sdk_env.ENV_IDP_ID,
        sdk_env.ENV_ID_TOKEN_FILE,
    )
    values = (None, "", "v1", " spaced value ")
    for combo in itertools.product(values, repeat=len(names)):
        yield {n: v for n, v in zip(names, combo, strict=True) if v is not None}


def apply_env(monkeypatch: pytest.MonkeyPatch, environ: Mapping[str, str]) -> None:
    for name in SDK_VARIABLES:
        if name != "HOME":
            monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


def test_the_environment_lookup_agrees_with_the_sdks_env_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = list(env_cases())
    assert len(cases) == 4**5
    for environ in cases:
        apply_env(monkeypatch, environ)
        sdk = sdk_outcome(EnvCredentialProvider.get_basic().get_credentials)
        assert gateway_env_outcome(environ) == sdk, environ


def test_the_oidc_refusal_matches_when_the_sdks_oidc_provider_applies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "oidc-token"
    token.write_text("header.payload.signature")
    names = (
        sdk_env.ENV_OIDC_PROVIDER_URN,
        sdk_env.ENV_OIDC_AGENCY_URN,
        sdk_env.ENV_OIDC_ID_TOKEN,
        sdk_env.ENV_OIDC_TOKEN_FILE,
    )
    for combo in itertools.product((None, "", "set"), repeat=len(names)):
        environ = {n: v for n, v in zip(names, combo, strict=True) if v is not None}
        if environ.get(sdk_env.ENV_OIDC_TOKEN_FILE):
            environ[sdk_env.ENV_OIDC_TOKEN_FILE] = str(token)
        apply_env(monkeypatch, environ)
        sdk_applies = sdk_outcome(OidcStsCredentialProvider.get_basic().get_credentials)
        ours = sdk_env.unsupported_env(environ)
        assert (sdk_applies == ("other",)) == (ours is not None and "OIDC" in ours), environ


PROFILES: list[str | bytes] = [
    "[basic]\nak = AK1\nsk = SK1\n",
    "[basic]\nak = AK1\nsk = SK1\nsecurity_token = TOK1\n",
    "[basic]\nak = AK1\nsk = SK1\nsecurity_token =\n",
    "[basic]\nak = AK1\n",
    "[basic]\nak = AK1\nsk =\n",
    "[global]\nak = AK1\nsk = SK1\n",
    "[BASIC]\nak = AK1\nsk = SK1\n",
    "[basic]\nAK = AK1\nSK = SK1\n",
    "[basic]\nak: AK1\nsk: SK1\n",
    "[DEFAULT]\nak = AK0\nsk = SK0\n[basic]\n",
    "[DEFAULT]\nsk = SK0\n[basic]\nak = AK1\n",
    "[basic]\nak = AK1 ; a comment\nsk = SK1\n",
    "[basic]\nak = AK1\nsk = S%K1\n",
    "[basic]\nak = AK1\nsk = S%%K1\n",
    "[basic]\nak = %(x)s\nsk = SK1\nx = AK2\n",
    "ak = AK1\nsk = SK1\n",
    "[basic]\nak = AK1\n[basic]\nsk = SK1\n",
    "[basic]\nak = AK1\nak = AK2\nsk = SK1\n",
    "[basic]\nak = AK1\nsk = SK1\n  continued\n",
    "[basic]\nnot a key value line\n",
    "[basic]\nak = AK1\nsk = SK1\nidp_id = idp\nid_token_file = /tmp/x\n",
    "[basic]\nak = AK1\nsk = SK1\nidp_id = idp\n",
    "[basic]\nak = AK1\nsk = SK1\nproject_id = p\niam_endpoint = https://iam.example\n",
    "\ufeff[basic]\nak = AK1\nsk = SK1\n",
    "[basic]\r\nak = AK1\r\nsk = SK1\r\n",
    b"[basic]\nak = AK1\nsk = \xff\xfe\n",
    "",
]


def gateway_profile_outcome(path: Path) -> tuple[str, ...]:
    try:
        keys = sdk_env.read_profile(path)
    except sdk_env.UnsupportedSource:
        return ("other",)
    if keys is None:
        return ("next",)
    token = keys.security_token.reveal() if keys.security_token else ""
    return ("keys", keys.ak, keys.sk.reveal(), token)


@pytest.mark.parametrize("index", range(len(PROFILES)))
def test_the_profile_lookup_agrees_with_the_sdks_profile_provider(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, index: int
) -> None:
    content = PROFILES[index]
    path = tmp_path / "credentials"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    monkeypatch.setenv(sdk_env.ENV_CREDENTIALS_FILE, str(path))
    sdk = sdk_outcome(ProfileCredentialProvider.get_basic().get_credentials)
    assert gateway_profile_outcome(path) == sdk


def test_random_profiles_agree_with_the_sdk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rng = random.Random(12)
    lines = [
        "[basic]",
        "[global]",
        "[DEFAULT]",
        "ak = AKR",
        "sk = SKR",
        "security_token = TOKR",
        "ak =",
        "sk=",
        "idp_id = i",
        "id_token_file = f",
        "# comment",
        "",
        "x = %(ak)s",
    ]
    path = tmp_path / "credentials"
    monkeypatch.setenv(sdk_env.ENV_CREDENTIALS_FILE, str(path))
    for _ in range(300):
        path.write_text("\n".join(rng.choices(lines, k=rng.randint(0, 8))) + "\n")
        sdk = sdk_outcome(ProfileCredentialProvider.get_basic().get_credentials)
        assert gateway_profile_outcome(path) == sdk, path.read_text()


def test_missing_or_unreadable_profile_paths_agree_with_the_sdk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for path in (tmp_path / "absent", tmp_path):  # no such file; a directory
        monkeypatch.setenv(sdk_env.ENV_CREDENTIALS_FILE, str(path))
        sdk = sdk_outcome(ProfileCredentialProvider.get_basic().get_credentials)
        assert gateway_profile_outcome(path) == sdk == ("next",)


@pytest.mark.parametrize(
    "environ",
    [
        {"HOME": "/home/h"},
        {"HOME": "/home/h", sdk_env.ENV_CREDENTIALS_FILE: "/etc/creds"},
        {"HOME": "/home/h", sdk_env.ENV_CREDENTIALS_FILE: ""},
        {sdk_env.ENV_CREDENTIALS_FILE: "relative/creds"},
        {},
    ],
)
def test_the_profile_path_is_the_sdks(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]
) -> None:
    monkeypatch.delenv("HOME", raising=False)
    apply_env(monkeypatch, environ)
    sdk = ProfileCredentialProvider._get_credentials_file_path()
    ours = sdk_env.profile_path(environ)
    assert (str(ours) if ours is not None else None) == (sdk or None)


# --- the chain -----------------------------------------------------------------------------------


def chain_config(environ: dict[str, str], metadata_url: str) -> SdkDefaultCredential:
    config = {
        "credentials": {"c": {"type": "sdk_default", "metadata_url": metadata_url}},
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "c"}],
    }
    cfg = parse_settings(config, environ).credentials["c"]
    assert isinstance(cfg, SdkDefaultCredential)
    return cfg


async def both_chains(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    environ: dict[str, str],
    metadata_url: str,
) -> tuple[Any, TemporaryKeys, str | None]:
    chain = SdkChain(chain_config(environ, metadata_url), session)
    ours = await chain.fetch()
    apply_env(monkeypatch, environ)
    sdk = await asyncio.to_thread(CredentialProviderChain.get_basic().get_credentials)
    return sdk, ours, chain.chosen


async def test_chain_environment_first_as_the_sdk(
    monkeypatch: pytest.MonkeyPatch, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    profile = tmp_path / "creds"
    profile.write_text("[basic]\nak = PAK\nsk = PSK\n")
    environ = {
        sdk_env.ENV_AK: "EAK",
        sdk_env.ENV_SK: "ESK",
        sdk_env.ENV_CREDENTIALS_FILE: str(profile),
        "HOME": str(tmp_path),
    }
    sdk, ours, kind = await both_chains(monkeypatch, session, environ, "http://127.0.0.1:1")
    assert kind == "environment"
    assert (sdk.ak, sdk.sk) == (ours.value, ours.secret.reveal()) == ("EAK", "ESK")


async def test_chain_profile_second_as_the_sdk(
    monkeypatch: pytest.MonkeyPatch, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    profile = tmp_path / "creds"
    profile.write_text("[basic]\nak = PAK\nsk = PSK\nsecurity_token = PTOK\n")
    environ = {sdk_env.ENV_AK: "only-ak", sdk_env.ENV_CREDENTIALS_FILE: str(profile)}
    sdk, ours, kind = await both_chains(monkeypatch, session, environ, "http://127.0.0.1:1")
    assert kind == "profile file"
    assert ours.security_token is not None
    assert (sdk.ak, sdk.sk, sdk.security_token) == (
        ours.value,
        ours.secret.reveal(),
        ours.security_token.reveal(),
    )


async def test_chain_metadata_third_as_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    platform: Platform,
    tmp_path: Path,
    token_file: Path,
) -> None:
    environ = {
        "HOME": str(tmp_path),
        sdk_env.ENV_POD_URI: platform.pod_identity_url,
        sdk_env.ENV_POD_TOKEN_FILE: str(token_file),
    }
    sdk, ours, kind = await both_chains(monkeypatch, session, environ, platform.metadata_url)
    assert kind == "ecs_metadata"
    assert (sdk.ak, sdk.sk, sdk.security_token) == (
        ours.value,
        ours.secret.reveal(),
        ours.security_token.reveal() if ours.security_token else None,
    )
    assert platform.pod_identity.requests == []


async def test_chain_pod_identity_when_the_metadata_service_fails_as_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    platform: Platform,
    tmp_path: Path,
    token_file: Path,
) -> None:
    platform.metadata.failures = [500, 500]  # one for each
    environ = {
        "HOME": str(tmp_path),
        sdk_env.ENV_POD_URI: platform.pod_identity_url,
        sdk_env.ENV_POD_TOKEN_FILE: str(token_file),
    }
    sdk, ours, kind = await both_chains(monkeypatch, session, environ, platform.metadata_url)
    assert kind == "pod_identity"
    assert sdk.ak == ours.value and sdk.sk == ours.secret.reveal()
    assert platform.pod_identity.calls == 2


async def test_an_unreachable_metadata_service_stops_the_sdks_chain_but_not_the_gateways(
    monkeypatch: pytest.MonkeyPatch,
    session: aiohttp.ClientSession,
    platform: Platform,
    tmp_path: Path,
    token_file: Path,
) -> None:
    """A known difference: the SDK's chain catches only its own exceptions, so a connection
    refused by the metadata address (a CCE pod whose node blocks it) ends the SDK's chain with
    requests' ConnectionError before pod identity is tried; the gateway moves on."""
    closed = "http://127.0.0.1:1"
    monkeypatch.setattr(MetadataAccessor, "_METADATA_ENDPOINT", closed)
    environ = {
        "HOME": str(tmp_path),
        sdk_env.ENV_POD_URI: platform.pod_identity_url,
        sdk_env.ENV_POD_TOKEN_FILE: str(token_file),
    }
    chain = SdkChain(chain_config(environ, closed), session)
    await chain.fetch()
    assert chain.chosen == "pod_identity"
    apply_env(monkeypatch, environ)
    with pytest.raises(requests.exceptions.ConnectionError):
        await asyncio.to_thread(CredentialProviderChain.get_basic().get_credentials)
