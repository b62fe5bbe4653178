"""Operating ``workload_identity``: ``/readyz``, the ``token`` command and the token metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import GatewayFactory, chat_body

from gateway import cli
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """The token command configures the root logger, as a CLI does; undo it afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def wi_config(cloud: FakeCloud, token_file: Path) -> dict[str, Any]:
    return {
        "credentials": {"wi": cloud.workload_identity_config(str(token_file))},
        "routes": [{"name": "chat", "upstream": cloud.service_url, "credential": "wi"}],
    }


async def run_token(*argv: str) -> int:
    """The real CLI entry point, on its own thread and event loop (the fakes serve on ours)."""
    return await asyncio.to_thread(cli.main, ["token", *argv])


async def test_token_command_shows_project_expiry_and_origin_never_the_token(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    id_token = cloud.iam.provider.mint()
    token_file.write_text(id_token)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(wi_config(cloud, token_file)))
    assert await run_token("--config", str(config)) == 0
    out, err = capsys.readouterr()
    project_id = cloud.iam.projects["cn-southwest-2"]
    assert out.startswith(f"wi: project cn-southwest-2 (id {project_id}), expires 20")
    assert out.rstrip().endswith("from IAM (workload identity)")
    assert "MII" not in out + err and id_token not in out + err
    assert await run_token("--config", str(config), "--credential", "wi", "--show") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and cloud.iam.is_valid(lines[1])
    assert len(cloud.iam.id_token_requests) == 2


async def test_token_command_with_a_missing_file_exits_1_naming_it(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "no-such-dir" / "token"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(wi_config(cloud, token_file)))
    assert await run_token("--config", str(config)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"credential 'wi' has no token: cannot read token_file {token_file}" in err
    assert cloud.iam.calls == 0


async def test_readyz_and_metrics_follow_the_token(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(cloud.iam.provider.mint(audience="not-the-client-id"))

    def use_wi(config: dict[str, Any]) -> None:
        config["credentials"] = wi_config(cloud, token_file)["credentials"]
        config["routes"][0]["credential"] = "wi"

    gw = await make_gateway(use_wi)
    cache = gw.app[GATEWAY].credentials["wi"].cache  # type: ignore[attr-defined]
    if cache._flight is not None:  # the first fetch, started at start-up
        await asyncio.gather(cache._flight, return_exceptions=True)
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "not ready"
    assert body["problems"][0].startswith("credential 'wi': IAM refused the identity (HTTP 401")
    assert gw.metric("gateway_token_expiry_timestamp_seconds", credential="wi") == 0

    # the token file gets the right audience; after the back-off, ready
    token_file.write_text(cloud.iam.provider.mint())
    cache._retry_at = 0.0  # the back-off (60 s after a rejection) has passed
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(stream=False)) as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/readyz") as resp:
        assert resp.status == 200
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="rejected") == 1
    assert gw.metric("gateway_token_refreshes_total", credential="wi", result="ok") == 1
    assert gw.metric("gateway_token_expiry_timestamp_seconds", credential="wi") == (
        cache.token.expires_at
    )
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    assert 'gateway_token_refreshes_total{credential="wi",result="ok"} 1.0' in text
