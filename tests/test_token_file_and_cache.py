"""Tokens that survive real life: token files, the on-disk cache, wall-clock jumps."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, agency, chat_body

from gateway.credentials.cache_file import TokenCacheFile
from gateway.credentials.token_cache import Token, TokenCache
from gateway.testing import FakeCloud


async def iam_token(cloud: FakeCloud, http: aiohttp.ClientSession) -> str:
    iam = cloud.iam
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": iam.user,
                        "password": iam.password,
                        "domain": {"name": iam.domain},
                    }
                },
            },
            "scope": {"project": {"name": "cn-southwest-2"}},
        }
    }
    async with http.post(cloud.iam_url + "/v3/auth/tokens", json=body) as resp:
        assert resp.status == 201
        return resp.headers["X-Subject-Token"]


async def chat(http: aiohttp.ClientSession, url: str, stream: bool = False) -> tuple[int, bytes]:
    async with http.post(url + "/v1/chat/completions", json=chat_body(stream)) as resp:
        return resp.status, await resp.read()


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --- token_file ---------------------------------------------------------------------------------


def token_file(path: Path) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"] = {"type": "token", "token_file": str(path)}

    return edit


def write(path: Path, text: str) -> None:
    """Replace the file atomically, as a well-behaved token tool does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_token_file_is_re_read_after_it_changes(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "token"
    first, second = await iam_token(cloud, http), await iam_token(cloud, http)
    write(path, first + "\n")
    gw = await make_gateway(token_file(path))
    assert (await chat(http, gw.url))[0] == 200
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == first
    write(path, second)
    assert (await chat(http, gw.url, stream=True))[0] == 200
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == second
    # rewritten in place (same inode, same size): the modification time tells
    path.write_text(first + "\n")
    os.utime(path, ns=(1, 1))
    assert (await chat(http, gw.url))[0] == 200
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == first
    logs = log_text(captured_logs)
    assert first not in logs and second not in logs


async def test_token_file_refused_token_is_replayed_once_the_file_changed(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    write(path, await iam_token(cloud, http))
    gw = await make_gateway(token_file(path))
    assert (await chat(http, gw.url))[0] == 200
    cloud.iam.revoke_all()
    status, body = await chat(http, gw.url)
    assert status == 502  # the file still holds the dead token: no replay helps
    assert json.loads(body)["error"]["code"] == "upstream_auth_rejected"
    write(path, await iam_token(cloud, http))
    assert (await chat(http, gw.url))[0] == 200


async def test_missing_token_file_is_a_502_naming_the_credential(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gw = await make_gateway(token_file(tmp_path / "nowhere"))
    status, body = await chat(http, gw.url)
    assert status == 502
    error = json.loads(body)["error"]
    assert error["code"] == "credential_unavailable"
    assert "credential 'main'" in error["message"] and "token_file" in error["message"]


async def test_emptied_token_file_keeps_the_last_good_token(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "token"
    token = await iam_token(cloud, http)
    write(path, token)
    gw = await make_gateway(token_file(path))
    assert (await chat(http, gw.url))[0] == 200
    path.write_text("")  # a tool truncating before it writes
    assert (await chat(http, gw.url))[0] == 200
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == token
    assert "is empty" in log_text(captured_logs)
    write(path, "two tokens\n")
    assert (await chat(http, gw.url))[0] == 200
    assert "no spaces or line breaks" in log_text(captured_logs)


# --- cache_file ---------------------------------------------------------------------------------


def cached(path: Path, **extra: Any) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"]["cache_file"] = str(path)
        config["credentials"]["main"].update(extra)

    return edit


async def test_cache_file_is_0600_and_spares_iam_after_a_restart(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "state" / "main.json"
    old_umask = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        first = await make_gateway(cached(path))
        assert (await chat(http, first.url))[0] == 200
    finally:
        os.umask(old_umask)
    assert cloud.iam.calls == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entry = json.loads(path.read_text())
    assert set(entry) == {"version", "fingerprint", "token", "expires_at", "project", "project_id"}
    assert cloud.iam.password not in path.read_text()
    token = entry["token"]
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == token
    await first.runner.cleanup()

    second = await make_gateway(cached(path))
    assert (await chat(http, second.url, stream=True))[0] == 200
    assert cloud.iam.calls == 1  # the second gateway never called IAM
    assert cloud.modelarts.requests[-1].headers["X-Auth-Token"] == token
    assert token not in log_text(captured_logs)
    # no temp files left; the fetch lock (shared by processes using the file) stays, empty
    assert sorted(p.name for p in path.parent.iterdir()) == [".main.json.lock", "main.json"]
    assert (path.parent / ".main.json.lock").stat().st_size == 0


async def run_with_cache(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, path: Path
) -> None:
    gw = await make_gateway(cached(path))
    assert (await chat(http, gw.url))[0] == 200


async def seed_cache(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, path: Path
) -> dict[str, Any]:
    await run_with_cache(cloud, make_gateway, http, path)
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(path.read_text())
    return entry


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p, e: p.write_text("{not json"), "corrupt or truncated"),
        (lambda p, e: p.write_bytes(b"\xff\xfe" * 10), "corrupt or truncated"),
        (lambda p, e: p.write_text(json.dumps({**e, "version": 9})), "unknown format version"),
        (lambda p, e: p.write_text(json.dumps({**e, "fingerprint": "0" * 64})), "another identity"),
        (lambda p, e: p.write_text(json.dumps({**e, "expires_at": 1.0})), "expired"),
        (lambda p, e: p.write_text(json.dumps({**e, "token": ""})), "holds no token"),
        (lambda p, e: p.chmod(0o644), "expected 0600"),
        (lambda p, e: p.write_text("x" * 70000), "too large"),
    ],
)
async def test_bad_cache_file_is_ignored_with_a_warning_and_replaced(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
    damage: Any,
    reason: str,
) -> None:
    path = tmp_path / "main.json"
    entry = await seed_cache(cloud, make_gateway, http, path)
    damage(path, entry)
    calls = cloud.iam.calls
    await run_with_cache(cloud, make_gateway, http, path)
    assert cloud.iam.calls == calls + 1  # not trusted: a fresh token from IAM
    warnings = [r.getMessage() for r in captured_logs.records if r.levelname == "WARNING"]
    assert any("ignoring cache_file" in w and reason in w for w in warnings), warnings
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["token"] != entry["token"]


async def test_cache_file_symlink_is_not_followed(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    real = tmp_path / "real.json"
    await seed_cache(cloud, make_gateway, http, real)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    await run_with_cache(cloud, make_gateway, http, link)
    assert cloud.iam.calls == 2
    assert "ignoring cache_file" in log_text(captured_logs)
    assert not link.is_symlink()  # replaced by a real file of its own


async def test_cache_file_of_another_password_is_foreign(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "main.json"
    await seed_cache(cloud, make_gateway, http, path)
    cloud.iam.password = "a-new-password"
    gw = await make_gateway(cached(path, password="a-new-password"))
    assert (await chat(http, gw.url))[0] == 200
    assert cloud.iam.calls == 2  # the file of the old password was not used


async def test_unwritable_cache_file_only_warns(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    gw = await make_gateway(cached(blocker / "main.json"))  # its directory cannot exist
    assert (await chat(http, gw.url))[0] == 200
    assert "cannot write cache_file" in log_text(captured_logs)


async def test_agency_cache_file_spares_both_iam_calls(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"]["cache_file"] = str(tmp_path / "main.json")
        config["credentials"]["other"] = agency(cloud, cache_file=str(tmp_path / "other.json"))
        config["routes"][0]["credential"] = "other"

    first = await make_gateway(edit)
    assert (await chat(http, first.url))[0] == 200
    assert cloud.iam.calls == 2
    await first.runner.cleanup()
    second = await make_gateway(edit)
    assert (await chat(http, second.url))[0] == 200
    assert cloud.iam.calls == 2


# --- the token cache and the wall clock ---------------------------------------------------------


async def test_expiry_is_judged_by_the_wall_clock_at_use() -> None:
    """A laptop that slept past expiry: monotonic time barely moved, the wall clock jumped."""
    wall = [1_000_000.0]
    fetched: list[str] = []

    async def fetch() -> Token:
        value = f"token-{len(fetched)}"
        fetched.append(value)
        return Token(value, expires_at=wall[0] + 3600)

    cache = TokenCache("c", fetch, refresh_margin=300, wall_clock=lambda: wall[0])
    assert (await cache.get()).value == "token-0"
    wall[0] += 1000
    assert (await cache.get()).value == "token-0"  # still well inside its lifetime
    wall[0] += 7200  # the machine slept for two hours
    assert cache.usable() is None
    assert (await cache.get()).value == "token-1"
    assert fetched == ["token-0", "token-1"]


async def test_cache_file_expiry_is_judged_by_the_wall_clock(tmp_path: Path) -> None:
    wall = [2_000_000.0]
    path = tmp_path / "c.json"
    file = TokenCacheFile("c", path, lambda: "fp", wall_clock=lambda: wall[0])
    file.save(Token("v", expires_at=wall[0] + 3600))
    loaded = file.load()
    assert loaded is not None and loaded.value == "v" and loaded.origin == "cache_file"
    wall[0] += 3600
    assert file.load() is None


def test_token_repr_hides_the_value() -> None:
    assert "secret-value" not in repr(Token("secret-value", expires_at=1.0))
