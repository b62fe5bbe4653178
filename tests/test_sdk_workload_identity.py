"""The official SDK's id-token request against the fake IAM, next to the gateway's.

``huaweicloudsdkcore`` (``auth/internal.py``: ``FederalAccessor``, ``IamHelper``) exchanges
the file named by ``HUAWEICLOUD_SDK_ID_TOKEN_FILE`` at ``POST /v3.0/OS-AUTH/id-token/tokens``
with ``X-Idp-Id`` from ``HUAWEICLOUD_SDK_IDP_ID``. The SDK asks for an *unscoped* token (it
then trades it for temporary AK/SK); the gateway asks for a project-scoped one (ModelArts
token-auth services take it as is). The same fake must answer both, so the fake answers what the
SDK expects and the gateway sends what the SDK sends plus the scope.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory, chat_body
from huaweicloudsdkcore.auth.internal import IamHelper, StsAccessor
from huaweicloudsdkcore.exceptions.exception_handler import DefaultExceptionHandler
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException, SdkException
from huaweicloudsdkcore.http.http_client import HttpClient
from huaweicloudsdkcore.http.http_config import HttpConfig

from gateway.credentials.token_cache import FetchFailed
from gateway.credentials.workload_identity import read_id_token
from gateway.testing import FakeCloud

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests honours proxy variables: the SDK must talk to the loopback fake directly."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def sdk_unscoped_token(iam_url: str, idp_id: str, token_file: Path) -> str:
    """What ``FederalAccessor.get_credential`` does first, with the SDK's own code."""
    client = HttpClient(
        HttpConfig.get_default_config(),
        None,
        DefaultExceptionHandler(),
        logging.getLogger("huaweicloudsdkcore.test"),
    )
    request = IamHelper.get_create_unscoped_token_by_id_token_request(
        client.config, iam_url, idp_id, StsAccessor._get_content(str(token_file))
    )
    token: str = IamHelper.create_unscoped_token_by_id_token(client, request)
    return token


async def test_sdk_and_gateway_send_the_same_id_token_request(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cloud.iam.provider.mint() + "\n")  # a trailing newline: both strip it
    sdk_token = await asyncio.to_thread(sdk_unscoped_token, cloud.iam_url, "cce-oidc", token_file)
    assert sdk_token.startswith("MII")

    def use_wi(config: dict[str, object]) -> None:
        config["credentials"] = {"wi": cloud.workload_identity_config(str(token_file))}
        config["routes"][0]["credential"] = "wi"  # type: ignore[index]

    gw = await make_gateway(use_wi)
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(stream=False)) as resp:
        assert resp.status == 200

    sdk, ours = cloud.iam.id_token_requests
    assert sdk.idp_id == ours.idp_id == "cce-oidc"
    assert sdk.id_token == ours.id_token == token_file.read_text().strip()
    assert sdk.scope is None  # unscoped: what the SDK trades for temporary AK/SK
    assert ours.scope == {"project": {"name": "cn-southwest-2"}}
    body_sdk, body_ours = cloud.iam.requests
    assert body_sdk["auth"]["id_token"] == body_ours["auth"]["id_token"]
    assert set(body_ours["auth"]) - set(body_sdk["auth"]) == {"scope"}
    # the SDK's unscoped token cannot call ModelArts; the gateway's scoped one did
    assert not cloud.iam.is_valid(sdk_token)
    assert cloud.iam.is_valid(cloud.modelarts.requests[-1].headers["X-Auth-Token"])


async def test_sdk_gets_the_fakes_refusal_of_a_bad_id_token(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cloud.iam.provider.mint(audience="someone-else"))
    with pytest.raises(ClientRequestException) as err:
        await asyncio.to_thread(sdk_unscoped_token, cloud.iam_url, "cce-oidc", token_file)
    assert err.value.status_code == 401
    # the SDK reads IAM's v3.0 error shape: error_code and error_msg
    assert err.value.error_code.startswith("IAM.")
    assert "audience" in err.value.error_msg


@pytest.mark.parametrize("content", [None, ""])
def test_sdk_and_gateway_both_refuse_a_missing_or_empty_file(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SdkException):
        StsAccessor._get_content(str(path))
    with pytest.raises(FetchFailed) as err:
        read_id_token(path)
    assert str(path) in err.value.reason
