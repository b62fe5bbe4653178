"""Live config changes (issue 11, item 4): SIGHUP and ``config_watch`` while a stream runs.

The process tests run ``python -m gateway`` with its stderr read line by line (waits are on log
lines, never on fixed sleeps), in front of the fake IAM (which counts token calls) and a gated
SSE upstream served by this test process: it sends half a stream, waits for the test to open the
gate, sends the rest, and keeps every byte it sent so the client's copy can be compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import (
    agency,
    free_port,
    open_raw,
    read_answer,
    request_bytes,
    start_gateway_process,
    stop_process,
    wait_healthy,
    write_raw,
)

from gateway.config.load import ConfigError, parse_config, parse_settings, read_config
from gateway.config.model import Settings
from gateway.server.app import build_app, make_runner
from gateway.server.reload import ConfigSource, Reloader, digest
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud, serve_on_loopback
from gateway.testing.metadata import start_platform

WAIT = 10.0  # bound on anything that must happen (a log line, a reload, the stream's end)

ALICE = "sk-alice-reload-5f0c2a9e41"
BOB = "sk-bob-reload-93d7e1b6c0a"
CAROL = "sk-carol-reload-2b8e6f4d17"
HALF = 3  # events sent before the gate


# --- a gated SSE upstream --------------------------------------------------------------------


@dataclass
class Gated:
    """An upstream that sends ``HALF`` events of a stream, waits for ``gate``, then the rest."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a stream waits at the gate
    sent: list[bytearray] = field(default_factory=list)  # each stream's bytes, as written
    tokens: list[str] = field(default_factory=list)  # X-Auth-Token of every request
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.tokens.append(request.headers.get("X-Auth-Token", ""))
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = bytearray()
        self.sent.append(sent)
        nonce = uuid.uuid4().hex
        for i in range(2 * HALF):
            if i == HALF:
                self.held.set()
                await self.gate.wait()
            event = b"data: " + json.dumps({"n": i, "nonce": nonce}).encode() + b"\n\n"
            await response.write(event)
            sent += event
        await response.write(b"data: [DONE]\n\n")
        sent += b"data: [DONE]\n\n"
        await response.write_eof()
        return response


@pytest.fixture
async def gated() -> AsyncIterator[Gated]:
    upstream = Gated()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner, url = await serve_on_loopback(app)
    upstream.url = url
    try:
        yield upstream
    finally:
        upstream.gate.set()
        await runner.cleanup()


# --- the gateway as a process, its log read line by line -----------------------------------------


class LogTail:
    """Every stderr line of a process, as it comes; ``wait`` awaits a line, no polling."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new.set()
        self._new.set()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait(self, text: str, count: int = 1) -> str:
        """The ``count``-th line containing ``text`` (waits for it, bounded)."""
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    found = [line for line in self.lines if text in line]
                    if len(found) >= count:
                        return found[count - 1]
                    if self.task.done():
                        raise AssertionError(f"the gateway exited before {text!r}:\n{self}")
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no log line with {text!r} within {WAIT} s:\n{self}") from None

    def __str__(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    url: str
    path: Path  # the config file the gateway was started with
    log: LogTail

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)


Spawn = Callable[..., Awaitable[Process]]


def configmap_write(directory: Path, config: dict[str, Any]) -> None:
    """Write ``directory/config.yaml`` the way the kubelet updates a ConfigMap volume.

    The file is a symlink into ``..data``, itself a symlink to a timestamped directory; an update
    writes a new directory and renames a new ``..data`` link over the old one (atomic).
    """
    fresh = directory / f"..{uuid.uuid4().hex}"
    fresh.mkdir()
    (fresh / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    link = directory / "..data_tmp"
    link.symlink_to(fresh.name)
    link.replace(directory / "..data")
    entry = directory / "config.yaml"
    if not entry.is_symlink():
        entry.symlink_to("..data/config.yaml")


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start ``python -m gateway --config DIR/config.yaml`` (a ConfigMap-style directory)."""
    started: list[tuple[asyncio.subprocess.Process, LogTail]] = []

    async def factory(config: dict[str, Any], *args: str) -> Process:
        directory = tmp_path / f"config{len(started)}"
        directory.mkdir()
        configmap_write(directory, config)
        path = directory / "config.yaml"
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        proc = await start_gateway_process(
            "--config", str(path), *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        tail = LogTail(proc.stderr)
        started.append((proc, tail))
        port = config["listen"]["port"]
        for i, arg in enumerate(args):
            if arg == "--port":
                port = int(args[i + 1])
        running = Process(proc, f"http://127.0.0.1:{port}", path, tail)
        await wait_healthy(running.url, proc, log=lambda: str(tail))
        return running

    try:
        yield factory
    finally:
        for proc, tail in started:
            await stop_process(proc)
            await tail.task


def team_config(cloud: FakeCloud, upstream: str, port: int | None = None) -> dict[str, Any]:
    """Two credentials (``main`` on /v1, ``side`` on /v2), keys alice and carol."""
    route = {
        "upstream": upstream,
        "heartbeat": 0,  # nothing but the upstream's bytes on the wire
        "timeouts": {"connect": 2, "first_byte": 5, "idle": 30, "total": 60},
    }
    return {
        "listen": {
            "host": "127.0.0.1",
            "port": port if port is not None else free_port(),
            "api_keys": [{"name": "alice", "key": ALICE}, {"name": "carol", "key": CAROL}],
        },
        "credentials": {
            "main": cloud.iam_password_config(),
            "side": {**cloud.iam_password_config(), "refresh_margin": "4m"},
        },
        "routes": [
            {"name": "chat", "path": "/v1", "credential": "main", **route},
            {"name": "side", "path": "/v2", "credential": "side", **route},
        ],
    }


def next_config(config: dict[str, Any]) -> dict[str, Any]:
    """Carol's key removed, bob's added, ``side`` redefined; ``main`` untouched."""
    new = json.loads(json.dumps(config))
    new["listen"]["api_keys"] = [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]
    new["credentials"]["side"]["refresh_margin"] = "5m"
    return new


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(http: aiohttp.ClientSession, url: str, key: str, path: str = "/v1") -> int:
    body = {"model": "m", "stream": False, "messages": []}
    async with http.post(f"{url}{path}/chat/completions", json=body, headers=bearer(key)) as r:
        await r.read()
        return r.status


async def metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{want}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class Stream:
    """A streaming request through the gateway, read up to the upstream's gate."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.received = bytearray()

    async def until_events(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.received.count(b"\n\n") < n:
                chunk = await self.response.content.readany()
                assert chunk, "the stream ended early"
                self.received += chunk

    async def rest(self) -> bytes:
        self.received += await asyncio.wait_for(self.response.content.read(), WAIT)
        return bytes(self.received)


async def reload_during_a_stream(
    gw: Process,
    cloud: FakeCloud,
    gated: Gated,
    reload: Callable[[], None],
    why: str,
) -> None:
    """The shared script of the SIGHUP and config_watch tests."""
    log = gw.log
    await log.wait("credential 'main': new token")
    await log.wait("credential 'side': new token")
    assert cloud.iam.calls == 2
    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, CAROL) == 200
        assert await call(http, gw.url, BOB) == 401
        body = {"model": "m", "stream": True, "messages": []}
        async with http.post(
            gw.url + "/v2/chat/completions", json=body, headers=bearer(CAROL)
        ) as resp:
            assert resp.status == 200
            stream = Stream(resp)
            await stream.until_events(HALF)
            await asyncio.wait_for(gated.held.wait(), WAIT)

            reload()
            line = await log.wait(f"config reloaded ({why})")
            assert "api keys: +bob -carol" in line, line
            assert "kept main" in line and "new side" in line, line

            # the next requests see the new keys, a removed key is refused at once
            assert await call(http, gw.url, BOB) == 200
            assert await call(http, gw.url, CAROL) == 401
            assert await call(http, gw.url, ALICE) == 200
            # the changed credential fetched one token, the unchanged one none
            await log.wait("credential 'side': new token", count=2)
            assert await call(http, gw.url, BOB, "/v2") == 200
            assert cloud.iam.calls == 3
            assert gated.tokens[-1] not in gated.tokens[:-1], "/v2 uses the new side token"
            # the old side credential serves the stream still in flight: not closed yet
            assert log.count("credential 'side': old instance closed") == 0

            gated.gate.set()
            received = await stream.rest()
        assert received == bytes(gated.sent[0]), "the stream is exactly what the upstream sent"
        await log.wait("credential 'side': old instance closed")
        assert log.count("credential 'main': old instance closed") == 0
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="ok") == 1
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="error") == 0
        assert cloud.iam.calls == 3
    for secret in (ALICE, BOB, CAROL, cloud.iam.password):
        assert secret not in str(log)


async def test_sighup_applies_new_keys_and_credentials_while_a_stream_finishes_untouched(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = team_config(cloud, gated.url)
    gw = await spawn(config)

    def reload() -> None:
        configmap_write(gw.path.parent, next_config(config))
        gw.hup()

    await reload_during_a_stream(gw, cloud, gated, reload, "SIGHUP")


async def test_config_watch_applies_a_configmap_update_while_a_stream_finishes_untouched(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = {**team_config(cloud, gated.url), "config_watch": "50ms"}
    gw = await spawn(config)
    # rewritten with the very same content: a poll sees no change, so no reload
    configmap_write(gw.path.parent, config)

    def reload() -> None:
        configmap_write(gw.path.parent, next_config(config))

    await reload_during_a_stream(gw, cloud, gated, reload, "config_watch")
    assert gw.log.count("config reloaded") == 1


async def test_invalid_reload_is_refused_whole_every_problem_logged_and_the_old_config_serves(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = team_config(cloud, gated.url)
    gw = await spawn(config)
    log = gw.log
    short = "sk-short-9"
    bad = next_config(config)  # bob's key would be valid, but the whole config is refused
    bad["listen"]["api_keys"].append({"name": "dave", "key": short})
    bad["routes"][1]["max_concurrency"] = 0
    bad["routes"][0]["timeouts"]["idle"] = "soon"
    async with aiohttp.ClientSession() as http:
        configmap_write(gw.path.parent, bad)
        gw.hup()
        await log.wait("config reload (SIGHUP) refused, the running config stays: 3 problem(s)")
        await log.wait("config reload: listen.api_keys[2].key: is shorter than 20 characters")
        await log.wait("config reload: routes[1].max_concurrency: must be >= 1")
        await log.wait("config reload: routes[0].timeouts.idle: expected a duration")
        assert await call(http, gw.url, CAROL) == 200, "the old keys still work"
        assert await call(http, gw.url, BOB) == 401, "nothing of the refused config applied"
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="error") == 1

        gw.path.parent.joinpath("..data", "config.yaml").unlink()
        (gw.path.parent / "..data" / "config.yaml").write_text("listen: [unclosed", "utf-8")
        gw.hup()
        await log.wait("config reload (SIGHUP) refused", count=2)
        await log.wait("not valid YAML (line 1")
        assert await call(http, gw.url, CAROL) == 200
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="error") == 2

        configmap_write(gw.path.parent, next_config(config))  # fixed: now it applies
        gw.hup()
        await log.wait("config reloaded (SIGHUP)")
        assert await call(http, gw.url, BOB) == 200
        assert await call(http, gw.url, CAROL) == 401
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="ok") == 1
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="error") == 2
    assert short not in str(log)
    assert "Traceback" not in str(log)


async def test_listen_port_change_is_logged_as_needing_a_restart_and_the_rest_applies(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = team_config(cloud, gated.url)
    port = config["listen"]["port"]
    gw = await spawn(config)
    other = free_port()
    changed = next_config(config)
    changed["listen"]["port"] = other
    changed["listen"]["backlog"] = 16
    configmap_write(gw.path.parent, changed)
    gw.hup()
    line = await gw.log.wait("listen.port changed")
    assert f"listen.port changed ({port} -> {other}), which needs a restart" in line
    await gw.log.wait("listen.backlog changed (1024 -> 16), which needs a restart")
    await gw.log.wait("config reloaded (SIGHUP)")
    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, BOB) == 200, "the rest of the change applied"
        with pytest.raises(aiohttp.ClientConnectorError):
            await call(http, f"http://127.0.0.1:{other}", BOB)
        assert await metric(http, gw.url, "gateway_config_reloads_total", result="ok") == 1


async def test_port_given_on_the_command_line_is_not_a_change_at_reload(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = team_config(cloud, gated.url)  # the file's port is not the one listened on
    gw = await spawn(config, "--port", str(free_port()))
    configmap_write(gw.path.parent, next_config(config))
    gw.hup()
    await gw.log.wait("config reloaded (SIGHUP)")
    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, BOB) == 200
    assert gw.log.count("needs a restart") == 0


# --- in process: the same reloader, driven directly -------------------------------------------


class Records(logging.Handler):
    """``gateway.reload`` log lines as they are emitted; ``wait`` awaits one (no polling)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._new = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._new.set()

    async def wait(self, text: str) -> str:
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    for line in self.lines:
                        if text in line:
                            return line
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no log line with {text!r}: {self.lines}") from None


@dataclass
class Live:
    """An in-process gateway serving from a config file that the test rewrites."""

    url: str
    app: web.Application
    path: Path
    records: Records

    @property
    def reloader(self) -> Reloader:
        reloader = self.app[GATEWAY].reloader
        assert reloader is not None
        return reloader

    async def reload(self, config: dict[str, Any]) -> bool:
        configmap_write(self.path.parent, config)
        return await self.reloader.reload("test")


LiveFactory = Callable[..., Awaitable[Live]]


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveFactory]:
    runners: list[web.AppRunner] = []
    records = Records()
    logger = logging.getLogger("gateway.reload")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    async def factory(
        config: dict[str, Any], overrides: Callable[[Settings], Settings] | None = None
    ) -> Live:
        directory = tmp_path / f"live{len(runners)}"
        directory.mkdir()
        configmap_write(directory, config)
        path = directory / "config.yaml"
        text = read_config(path)
        settings = parse_config(text, path, {})
        source = ConfigSource(path, {}, overrides or (lambda s: s), digest(text))
        if overrides is not None:
            settings = overrides(settings)
        app = build_app(settings, source=source)
        runner = make_runner(app, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return Live(f"http://127.0.0.1:{runner.addresses[0][1]}", app, path, records)

    try:
        yield factory
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        logger.removeHandler(records)
        logger.setLevel(old_level)


async def test_concurrency_in_flight_counts_across_a_reload_and_the_new_limit_applies(
    cloud: FakeCloud, gated: Gated, live: LiveFactory
) -> None:
    config = team_config(cloud, gated.url)
    config["listen"]["api_keys"][0]["max_concurrency"] = 1  # alice
    gw = await live(config)
    body = {"model": "m", "stream": True, "messages": []}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(ALICE)) as resp,
    ):
        stream = Stream(resp)
        await stream.until_events(HALF)
        renamed = json.loads(json.dumps(config))
        renamed["routes"][0]["max_body"] = "1MiB"  # a change, alice's limit the same
        assert await gw.reload(renamed)
        # the stream from before the reload still holds alice's one slot
        assert await call(http, gw.url, ALICE) == 429
        assert await call(http, gw.url, CAROL) == 200
        raised = json.loads(json.dumps(renamed))
        raised["listen"]["api_keys"][0]["max_concurrency"] = 2
        assert await gw.reload(raised)
        assert await call(http, gw.url, ALICE) == 200
        gated.gate.set()
        assert await stream.rest() == bytes(gated.sent[0])


async def test_routes_and_models_change_with_a_reload(
    cloud: FakeCloud, gated: Gated, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)
    gw = await live(config)
    async with aiohttp.ClientSession() as http:

        async def models() -> list[str]:
            async with http.get(gw.url + "/v1/models", headers=bearer(ALICE)) as resp:
                assert resp.status == 200
                return [m["id"] for m in (await resp.json())["data"]]

        assert await models() == [cloud.modelarts.model], "no models configured: proxied"
        changed = json.loads(json.dumps(config))
        changed["routes"][0]["models"] = ["alpha", "beta"]
        del changed["routes"][1]  # /v2 goes
        changed["credentials"].pop("side")
        assert await gw.reload(changed)
        assert await models() == ["alpha", "beta"]
        assert await call(http, gw.url, ALICE, "/v2") == 404
        line = await gw.records.wait("config reloaded (test)")
        assert "routes: -side ~chat" in line and "dropped side" in line, line
    assert gw.app[GATEWAY].credentials.keys() == {"main"}


async def test_agency_is_kept_with_its_via_and_rebuilt_when_the_via_changes(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)
    config["credentials"]["side"] = agency(cloud, via="main")
    config["routes"] = config["routes"][:1]
    config["routes"][0]["credential"] = "side"  # the agency serves; main is only its via
    gw = await live(config)

    def methods() -> list[str]:
        return sorted(m for r in cloud.iam.requests for m in r["auth"]["identity"]["methods"])

    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, ALICE) == 200
        assert methods() == ["assume_role", "password"]
        same = json.loads(json.dumps(config))
        same["listen"]["api_keys"].append({"name": "bob", "key": BOB})
        assert await gw.reload(same)
        assert await call(http, gw.url, BOB) == 200
        assert methods() == ["assume_role", "password"], "both kept: no IAM call"

        via_changed = json.loads(json.dumps(same))
        via_changed["credentials"]["main"]["refresh_margin"] = "2m"
        assert await gw.reload(via_changed)
        assert await call(http, gw.url, BOB) == 200
        assert methods() == ["assume_role"] * 2 + ["password"] * 2, "the agency follows its via"
        line = await gw.records.wait("new main side")
        assert "credentials: new main side; dropped main side" in line, line


async def test_workload_identity_and_temporary_keys_are_kept_when_unchanged(
    cloud: FakeCloud, live: LiveFactory, tmp_path: Path
) -> None:
    """Issue 12's types across a reload: kept (no new fetch, same cache) when their definition
    did not change; the one whose definition changed is rebuilt and fetches anew."""
    platform = await start_platform([cloud.modelarts], "pod-token-for-reload")
    try:
        sa_token, pod_token = tmp_path / "sa-token", tmp_path / "pod-token"
        sa_token.write_text(cloud.iam.provider.mint())
        pod_token.write_text("pod-token-for-reload")
        config = team_config(cloud, cloud.service_url)
        config["credentials"] = {
            "main": cloud.iam_password_config(),
            "side": cloud.workload_identity_config(str(sa_token)),
            "md": {"type": "ecs_metadata", "metadata_url": platform.metadata_url},
            "pod": {
                "type": "pod_identity",
                "uri": platform.pod_identity_url,
                "token_file": str(pod_token),
            },
            "sdk": {"type": "sdk_default", "metadata_url": platform.metadata_url},
        }
        gw = await live(config)
        before = dict(gw.app[GATEWAY].credentials)
        for name in ("md", "pod", "sdk"):
            await before[name].keys()  # type: ignore[attr-defined]
        await before["side"].token()  # type: ignore[attr-defined]

        def calls() -> tuple[int, int, int]:
            wi = len(cloud.iam.id_token_requests)
            return wi, platform.metadata.calls, platform.pod_identity.calls

        fetched = calls()
        same = json.loads(json.dumps(config))
        same["listen"]["api_keys"].append({"name": "bob", "key": BOB})
        assert await gw.reload(same)
        line = await gw.records.wait("config reloaded (test)")
        assert "credentials: kept main md pod sdk side" in line, line
        assert all(gw.app[GATEWAY].credentials[n] is c for n, c in before.items())
        assert calls() == fetched, "kept: nothing fetched again"

        changed = json.loads(json.dumps(same))
        changed["credentials"]["md"]["refresh_margin"] = "4m"
        assert await gw.reload(changed)
        line = await gw.records.wait("new md")
        assert "credentials: kept main pod sdk side; new md" in line, line
        now = gw.app[GATEWAY].credentials
        assert now["md"] is not before["md"] and now["sdk"] is before["sdk"]
        await now["md"].keys()  # type: ignore[attr-defined]
        assert calls() == (fetched[0], fetched[1] + 1, fetched[2])
    finally:
        await platform.close()


async def test_reload_that_would_expose_the_real_listener_without_keys_is_refused(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)

    def wildcard(settings: Settings) -> Settings:  # as `serve --host 0.0.0.0` does
        return replace(settings, listen=replace(settings.listen, host="0.0.0.0"))

    gw = await live(config, wildcard)
    open_config = json.loads(json.dumps(config))
    del open_config["listen"]["api_keys"]
    assert not await gw.reload(open_config)
    line = await gw.records.wait("config reload: listen.host: '0.0.0.0' is reachable")
    assert "listen.api_keys is empty" in line
    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, ALICE) == 200
        async with http.post(gw.url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 401, "keys are still required"


async def test_a_reload_can_turn_config_watch_on(cloud: FakeCloud, live: LiveFactory) -> None:
    config = team_config(cloud, cloud.service_url)  # config_watch: off
    gw = await live(config)
    watched = {**json.loads(json.dumps(config)), "config_watch": "20ms"}
    assert await gw.reload(watched)
    configmap_write(gw.path.parent, next_config(watched))  # no reload() call: the watch sees it
    await gw.records.wait("config reloaded (config_watch)")
    async with aiohttp.ClientSession() as http:
        assert await call(http, gw.url, BOB) == 200
        assert await call(http, gw.url, CAROL) == 401


async def test_shutdown_grace_from_a_reload_applies_to_the_next_stop(
    cloud: FakeCloud, gated: Gated, spawn: Spawn
) -> None:
    config = team_config(cloud, gated.url)
    config["listen"]["shutdown_grace"] = "60s"
    gw = await spawn(config)
    shorter = json.loads(json.dumps(config))
    shorter["listen"]["shutdown_grace"] = "200ms"
    configmap_write(gw.path.parent, shorter)
    gw.hup()
    await gw.log.wait("config reloaded (SIGHUP)")
    body = {"model": "m", "stream": True, "messages": []}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(ALICE)) as resp,
    ):
        stream = Stream(resp)
        await stream.until_events(HALF)
        gw.proc.send_signal(signal.SIGTERM)  # the gate stays shut: only the grace ends it
        received = await stream.rest()
    assert b'"code": "shutdown"' in received.rsplit(b"\n\n", 2)[-2]
    assert await asyncio.wait_for(gw.proc.wait(), WAIT) == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (-5, "config_watch: must not be negative"),
        ("soon", "config_watch: expected a duration"),
        (True, "config_watch: expected a duration"),
    ],
)
def test_bad_config_watch_is_a_config_error_naming_the_key(value: object, problem: str) -> None:
    config = {"config_watch": value, "credentials": {"c": {"type": "none"}}}
    config["routes"] = [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "c"}]
    with pytest.raises(ConfigError) as caught:
        parse_settings(config, {})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_config_watch_takes_a_duration_and_defaults_to_off() -> None:
    config: dict[str, Any] = {"credentials": {"c": {"type": "none"}}}
    config["routes"] = [{"name": "r", "upstream": "http://127.0.0.1:1", "credential": "c"}]
    assert parse_settings(config, {}).config_watch == 0
    assert parse_settings({**config, "config_watch": "10s"}, {}).config_watch == 10.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("host", "127.0.0.2"),
        ("port", 1),
        ("backlog", 16),
        ("header_timeout", 7),
        ("keepalive_timeout", 7),
        ("max_connections", 7),
    ],
)
async def test_each_start_bound_listen_key_is_logged_as_needing_a_restart_and_kept(
    cloud: FakeCloud, live: LiveFactory, name: str, value: object
) -> None:
    config = team_config(cloud, cloud.service_url)
    gw = await live(config)
    before = getattr(gw.app[GATEWAY].settings.listen, name)
    changed = next_config(config)
    changed["listen"][name] = value
    assert await gw.reload(changed)
    shown = f"{before:g}" if isinstance(before, float) else before
    await gw.records.wait(f"listen.{name} changed ({shown} -> {value}), which needs a restart")
    settings = gw.app[GATEWAY].settings
    assert getattr(settings.listen, name) == before, "the running value stays"
    assert [k.name for k in settings.listen.api_keys] == ["alice", "bob"], "the rest applied"


async def test_listen_keys_read_per_request_apply_at_once(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)
    gw = await live(config)
    origin = "https://app.example"
    headers = {**bearer(ALICE), "Origin": origin, "X-Padding": "x" * 2000}
    body = {"model": "m", "stream": False, "messages": []}
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 403, "a foreign origin, before the reload"
        changed = json.loads(json.dumps(config))
        changed["listen"]["allowed_origins"] = [origin]
        assert await gw.reload(changed)
        async with http.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == origin
        changed["listen"]["max_header_bytes"] = "1KiB"
        assert await gw.reload(changed)
        async with http.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 431


def test_readme_reload_example_is_a_valid_config() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Reloading the config", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    env = {
        "CI_BOT_KEY": "sk-ci-bot-0123456789abcdef",
        "HWC_DOMAIN": "d",
        "HWC_USER": "u",
        "HWC_PASSWORD": "p",
        "MODELARTS_SERVICE_URL": "https://example.invalid/v1/infers/x",
    }
    settings = parse_settings(yaml.safe_load(example), env)
    assert settings.config_watch == 10.0
    assert [k.name for k in settings.listen.api_keys] == ["alice", "ci-bot"]


async def test_removed_key_is_refused_on_its_next_request_even_on_a_kept_alive_connection(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)
    gw = await live(config)
    host = gw.url.removeprefix("http://")
    body = json.dumps({"model": "m", "stream": False, "messages": []}).encode()
    request = request_bytes(
        "POST",
        "/v1/chat/completions",
        host,
        body,
        {"Authorization": f"Bearer {CAROL}", "Content-Type": "application/json"},
    )
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, request)
        first = await read_answer(reader)
        assert first is not None and first.status == 200
        assert await gw.reload(next_config(config))  # carol's key is gone
        await write_raw(writer, request)  # the same connection, kept alive
        second = await read_answer(reader)
        assert second is not None and second.status == 401
        assert json.loads(second.body)["error"]["code"] == "invalid_api_key"
    finally:
        writer.close()


async def test_key_request_counts_survive_a_reload_the_new_limit_applies_a_new_store_waits(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    config = team_config(cloud, cloud.service_url)
    config["listen"]["api_keys"][0]["requests_per_minute"] = 2  # alice
    gw = await live(config)
    async with aiohttp.ClientSession() as http:
        assert [await call(http, gw.url, ALICE) for _ in range(2)] == [200, 200]
        raised = json.loads(json.dumps(config))
        raised["listen"]["api_keys"][0]["requests_per_minute"] = 3
        assert await gw.reload(raised)
        # the two before the reload still count: one more, then the new limit refuses
        assert [await call(http, gw.url, ALICE) for _ in range(2)] == [200, 429]
        moved = json.loads(json.dumps(raised))
        moved["limits_store"] = {"type": "redis", "url": "redis://:pw-not-logged@127.0.0.1:1/0"}
        assert await gw.reload(moved)
        line = await gw.records.wait("limits_store changed")
        assert "needs a restart" in line and "pw-not-logged" not in line
        assert await call(http, gw.url, ALICE) == 429, "still counted in memory, as before"


async def test_a_reload_that_moves_an_alias_keeps_the_keys_token_count_and_its_public_label(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    # the seam of reload, aliases and token limits: alice may use "pub" only, 12 tokens a
    # minute, 6 per request (1 prompt word, 5 events); a reload points "pub" elsewhere
    cloud.modelarts.script.events = 5
    config = team_config(cloud, cloud.service_url)
    config["routes"][0]["models"] = [{"name": "pub", "upstream": "m-one"}]
    config["listen"]["api_keys"][0].update({"tokens_per_minute": 12, "models": ["pub"]})
    gw = await live(config)
    body = {"model": "pub", "messages": [{"role": "user", "content": "Hi"}]}

    async def ask() -> int:
        url = gw.url + "/v1/chat/completions"
        async with http.post(url, json=body, headers=bearer(ALICE)) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession() as http:
        assert [await ask(), await ask()] == [200, 200]
        moved = json.loads(json.dumps(config))
        moved["routes"][0]["models"] = [{"name": "pub", "upstream": "m-two"}]
        assert await gw.reload(moved)
        assert await ask() == 429, "the 12 tokens from before the reload still count"
        raised = json.loads(json.dumps(moved))
        raised["listen"]["api_keys"][0]["tokens_per_minute"] = 13
        assert await gw.reload(raised)
        assert [await ask(), await ask()] == [200, 429]
        sent = [json.loads(r.body)["model"] for r in cloud.modelarts.requests]
        assert sent == ["m-one", "m-one", "m-two"]
        # the exposition sorts the labels: key, kind, model, route
        labels = {"key": "alice", "kind": "completion", "model": "pub", "route": "chat"}
        assert await metric(http, gw.url, "gateway_tokens_total", **labels) == 15
        assert (
            await metric(
                http, gw.url, "gateway_rate_limited_total", key="alice", limit="tokens_per_minute"
            )
            == 2
        )


async def test_a_key_removed_and_added_back_under_its_name_finds_its_count(
    cloud: FakeCloud, live: LiveFactory
) -> None:
    # counts are per key name: rotating a key's secret (remove, add back) is no quota reset
    config = team_config(cloud, cloud.service_url)
    config["listen"]["api_keys"][0]["requests_per_minute"] = 2  # alice
    gw = await live(config)
    async with aiohttp.ClientSession() as http:
        assert [await call(http, gw.url, ALICE) for _ in range(2)] == [200, 200]
        removed = json.loads(json.dumps(config))
        del removed["listen"]["api_keys"][0]
        assert await gw.reload(removed)
        assert await call(http, gw.url, ALICE) == 401
        rotated = json.loads(json.dumps(config))
        rotated["listen"]["api_keys"][0]["key"] = BOB  # a new secret for the name alice
        assert await gw.reload(rotated)
        assert await call(http, gw.url, ALICE) == 401, "the old secret is gone"
        assert await call(http, gw.url, BOB) == 429, "alice's two requests still count"
        assert await call(http, gw.url, CAROL) == 200
