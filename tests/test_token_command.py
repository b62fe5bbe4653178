"""``modelarts-gateway token``: fetch a token, show project and expiry, never the token unasked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import agency, base_config

from gateway import cli
from gateway.testing import FakeCloud


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """The command configures the root logger, as a CLI does; undo it for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_config(cloud: FakeCloud, tmp_path: Path, **credentials: dict[str, Any]) -> str:
    config = base_config(cloud)
    config["credentials"].update(credentials)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


async def run(*argv: str) -> int:
    """The real CLI entry point, on its own thread and event loop (the fakes serve on ours)."""
    return await asyncio.to_thread(cli.main, list(argv))


async def test_prints_project_and_expiry_but_not_the_token(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(cloud, tmp_path, key={"type": "api_key", "key": "k"})
    assert await run("token", "--config", config) == 0
    out, err = capsys.readouterr()
    project_id = cloud.iam.projects["cn-southwest-2"]
    assert out.startswith(f"main: project cn-southwest-2 (id {project_id}), expires 20")
    assert "(in 23 h 59 min), from IAM" in out or "(in 24 h 00 min), from IAM" in out
    assert "MII" not in out + err
    assert cloud.iam.calls == 1


async def test_show_prints_the_token(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(cloud, tmp_path)
    assert await run("token", "--config", config, "--credential", "main", "--show") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("MII")
    assert cloud.iam.is_valid(lines[1])


async def test_agency_and_cache_file_origin(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = agency(cloud, cache_file=str(tmp_path / "other.json"))
    config = write_config(cloud, tmp_path, other=other)
    assert await run("token", "--config", config, "--credential", "other") == 0
    assert "from IAM" in capsys.readouterr().out
    assert await run("token", "--config", config, "--credential", "other") == 0
    assert capsys.readouterr().out.startswith("other: project cn-southwest-2")
    assert await run("token", "--config", config, "--credential", "other") == 0
    assert "from cache_file" in capsys.readouterr().out
    assert cloud.iam.calls == 2  # one password token, one agency token


async def test_static_token_has_unknown_expiry(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(cloud, tmp_path, fixed={"type": "token", "token": "abc"})
    assert await run("token", "--config", config, "--credential", "fixed") == 0
    out = capsys.readouterr().out
    assert out.startswith("fixed: project -, expiry unknown") and "abc" not in out


async def test_wrong_password_exits_1_with_iams_reason(
    cloud: FakeCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_dict = base_config(cloud)
    config_dict["credentials"]["main"]["password"] = "wrong-password-123"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    assert await run("token", "--config", str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "credential 'main' has no token" in err and "username or password is wrong" in err
    assert "wrong-password-123" not in err
    assert cloud.iam.calls == 1  # never retried in a loop


async def test_iam_down_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {
        "credentials": {
            "main": {
                "type": "iam_password",
                "iam_url": "http://127.0.0.1:9",
                "domain": "d",
                "user": "u",
                "password": "p",
                "project": "cn-southwest-2",
            }
        },
        "routes": [{"name": "r", "upstream": "http://127.0.0.1:9/x", "credential": "main"}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert await run("token", "--config", str(path)) == 1
    assert "IAM unreachable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--credential", "nobody"], "no credential named 'nobody' (known: main, key)"),
        (["--credential", "key"], "credential 'key' does not use IAM tokens"),
    ],
)
async def test_unknown_or_tokenless_credential_exits_2(
    cloud: FakeCloud,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    config = write_config(cloud, tmp_path, key={"type": "api_key", "key": "k"})
    assert await run("token", "--config", config, *args) == 2
    assert message in capsys.readouterr().err
    assert cloud.iam.calls == 0


async def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("credentials: {main: {type: agency, via: main}}\nroutes: []\n")
    assert await run("token", "--config", str(path)) == 2
    assert "credentials.main.via: must name another credential" in capsys.readouterr().err
