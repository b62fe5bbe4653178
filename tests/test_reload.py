"""Live config changes (issue 11, item 4): SIGHUP and ``config_watch`` while a stream runs.

The process tests run ``python -m gateway`` with its stderr read line by line (waits are on log
lines, never on fixed sleeps), in front of the fake IAM (which counts token calls) and a gated
SSE upstream served by this test process: it sends half a stream, waits for the test to open the
gate, sends the rest, and keeps every byte it sent so the client's copy can be compared.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import (
    free_port,
    start_gateway_process,
    stop_process,
    wait_healthy,
)

from gateway.testing import FakeCloud, serve_on_loopback

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
