"""``modelarts-gateway token`` for temporary AK/SK sources (issue 12, item 4): the source kind and
the expiry, never a key, not even with ``--show``."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli
from gateway.testing.metadata import Platform, start_platform
from gateway.testing.modelarts import FakeModelArts

POD_TOKEN = "pod-token-for-the-token-command"


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def platform() -> AsyncIterator[Platform]:
    fake = await start_platform([FakeModelArts()], POD_TOKEN)
    try:
        yield fake
    finally:
        await fake.close()


def write_config(tmp_path: Path, **credentials: dict[str, Any]) -> str:
    name = next(iter(credentials))
    config = {
        "credentials": credentials,
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:9/x", "credential": name}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def write(path: Path, text: str) -> None:
    path.write_text(text)


async def run(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def secrets_of(platform: Platform) -> list[str]:
    values = [POD_TOKEN]
    for keys in platform.issuer.issued:
        values += [keys.access, keys.secret, keys.security_token]
    return values


async def test_ecs_metadata_shows_source_and_expiry_never_a_key(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, md={"type": "ecs_metadata", "metadata_url": platform.metadata_url}
    )
    assert await run("token", "--config", config, "--show") == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(
        r"md: AK/SK with security token, expires 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ "
        r"\(in (0 h 59|1 h 00) min\), from ecs_metadata\n",
        out,
    ), out
    assert "--show prints no AK/SK" in err
    assert platform.issuer.issued  # keys were really fetched
    for secret in secrets_of(platform):
        assert secret not in out + err


async def test_pod_identity_and_sdk_default_name_their_source(
    platform: Platform,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token_file = tmp_path / "token"
    write(token_file, POD_TOKEN)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HUAWEICLOUD_SDK_AK", "ENVAK")
    monkeypatch.setenv("HUAWEICLOUD_SDK_SK", "env-sk-never-shown")
    pod = {"type": "pod_identity", "uri": platform.pod_identity_url, "token_file": str(token_file)}
    config = write_config(
        tmp_path,
        pod=pod,
        sdk={"type": "sdk_default", "metadata_url": platform.metadata_url},
    )
    assert await run("token", "--config", config) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("pod: AK/SK with security token, expires 20")
    assert lines[0].endswith("from pod_identity")
    assert lines[1] == (
        "sdk: AK/SK without security token, no expiry (keys managed outside the gateway), "
        "from environment"
    )
    assert "ENVAK" not in out + err and "env-sk-never-shown" not in out + err
    assert platform.metadata.requests == []


async def test_a_failing_source_exits_1_with_a_safe_reason(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    platform.metadata.agency = False
    config = write_config(
        tmp_path, md={"type": "ecs_metadata", "metadata_url": platform.metadata_url}
    )
    assert await run("token", "--config", config, "--credential", "md") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "no agency is bound to this server" in err
