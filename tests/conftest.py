"""Shared fixtures and helpers: the fake cloud, the real gateway (in process or as a process),
raw sockets; all on loopback. Tests import the plain helpers with ``from conftest import X``."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import loopback_only
import pytest
from aiohttp import web
from yarl import URL

from gateway.config.load import parse_settings
from gateway.config.model import Settings
from gateway.metrics import Metrics
from gateway.server.app import build_app, make_runner
from gateway.server.state import METRICS
from gateway.testing import FakeCloud, start_fake_cloud

loopback_only.install()

# GATEWAY_TEST_LOOP=uvloop: every test on uvloop, the loop the gateway serves on when installed
# (the speed extra). Its connects and name lookups happen in C, out of the audit hook's sight,
# so the loopback guard then covers only what the tests do themselves.
TEST_LOOP = os.environ.get("GATEWAY_TEST_LOOP", "asyncio")


def pytest_configure(config: pytest.Config) -> None:
    if TEST_LOOP == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif TEST_LOOP != "asyncio":
        raise pytest.UsageError(f"GATEWAY_TEST_LOOP must be asyncio or uvloop, not {TEST_LOOP!r}")


@pytest.fixture(autouse=True)
def _only_loopback() -> Iterator[None]:
    """Fail any test that tried to reach an address other than loopback (tests/loopback_only.py)."""
    start = len(loopback_only.blocked)
    yield
    tried = loopback_only.blocked[start:]
    assert not tried, f"the test tried to leave loopback: {tried}"


MODEL = "qwen2-7b"
ROOT = Path(__file__).resolve().parents[1]  # the repository: cwd of every gateway process
RAW_WAIT = 3.0  # bound on each read of a raw-socket answer


def base_config(cloud: FakeCloud) -> dict[str, Any]:
    """A gateway config (as parsed YAML) in front of ``cloud``; tests edit a copy."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "credentials": {"main": cloud.iam_password_config()},
        "routes": [
            {
                "name": "chat",
                "path": "/v1",
                "upstream": cloud.service_url,
                "credential": "main",
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
            }
        ],
    }


@dataclass
class RunningGateway:
    url: str  # http://127.0.0.1:PORT
    app: web.Application
    runner: web.AppRunner
    settings: Settings

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from the app's own registry (0 when absent)."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return value if value is not None else 0.0


async def start_gateway(settings: Settings) -> RunningGateway:
    app = build_app(settings)
    runner = make_runner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningGateway(f"http://127.0.0.1:{port}", app, runner, settings)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def cloud() -> AsyncIterator[FakeCloud]:
    fake = await start_fake_cloud()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def make_gateway(cloud: FakeCloud) -> AsyncIterator[GatewayFactory]:
    """Start a gateway from ``base_config(cloud)`` edited by the test's ``edit(config)``."""
    started: list[RunningGateway] = []

    async def factory(
        edit: Callable[[dict[str, Any]], None] | None = None,
        environ: dict[str, str] | None = None,
    ) -> RunningGateway:
        config = copy.deepcopy(base_config(cloud))
        if edit is not None:
            edit(config)
        gw = await start_gateway(parse_settings(config, environ or {}))
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in reversed(started):
            await gw.runner.cleanup()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record of every logger, at DEBUG, formatted as the gateway would."""
    caplog.set_level(logging.DEBUG)
    return caplog


def chat_body(stream: bool = True, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hi"}],
        **extra,
    }


def agency(cloud: FakeCloud, via: str = "main", **extra: Any) -> dict[str, Any]:
    """An agency credential (as parsed YAML) the fake IAM accepts, through credential ``via``."""
    return {
        "type": "agency",
        "via": via,
        "iam_url": cloud.iam_url,
        "domain_name": "other-account",
        "agency_name": "modelarts-agency",
        "project": "cn-southwest-2",
        **extra,
    }


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the gateway as a process -------------------------------------------------------------------

Output = int | IO[Any] | None  # what asyncio.create_subprocess_exec takes for stdout/stderr


async def start_gateway_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdout: Output = asyncio.subprocess.DEVNULL,
    stderr: Output = asyncio.subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    """``python -m gateway ARGS`` from the repository root, stdin closed; the caller stops it."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )


async def wait_healthy(
    url: str,
    proc: asyncio.subprocess.Process,
    within: float = 10.0,
    log: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``url``/healthz until 200; fail at once (with ``log()``) if ``proc`` exits.

    Polling, because another process gives no event to await; bounded by ``within``.
    """
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(within):
                while True:
                    assert proc.returncode is None, f"the gateway exited:\n{log()}"
                    try:
                        async with session.get(url + "/healthz") as resp:
                            if resp.status == 200:
                                return
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.025)
        except TimeoutError:
            raise AssertionError(f"the gateway did not start within {within} s:\n{log()}") from None


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it still runs, and reap it: the ``finally`` of every process test."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def run_gateway_cli(
    *args: str, env: Mapping[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` to completion (bounded), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=20,
    )


# --- raw sockets: what a polite client never sends ----------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]  # names title-cased; a repeated header keeps its last value
    body: bytes


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the host and port of ``url``."""
    parsed = URL(url)
    return await asyncio.open_connection(parsed.host, parsed.port)


async def read_answer(reader: asyncio.StreamReader) -> RawAnswer | None:
    """One response, its body read by Content-Length; None if closed before a whole head.

    Not read to EOF: a server may keep the connection open waiting for a body it was promised.
    """
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_WAIT)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().title()] = value.strip()
    length = int(headers.get("Content-Length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), RAW_WAIT)
    return RawAnswer(int(lines[0].split()[1]), headers, body)


async def write_raw(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` as is; the server may close before it has read all of it (allowed)."""
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass


async def raw_exchange(url: str, data: bytes) -> RawAnswer | None:
    """Send ``data`` on a new connection and read one answer (None: closed without one)."""
    reader, writer = await open_raw(url)
    try:
        await write_raw(writer, data)
        return await read_answer(reader)
    finally:
        writer.close()


async def raw_until_closed(url: str, data: bytes) -> bytes:
    """Send ``data`` on a new connection and return all the server sent until it closed."""
    reader, writer = await open_raw(url)
    try:
        await write_raw(writer, data)
        return await asyncio.wait_for(reader.read(), RAW_WAIT)
    finally:
        writer.close()


# --- an upstream that records the exact bytes it receives ---------------------------------------

OK_JSON = b'{"id":"x","object":"chat.completion","choices":[]}'


class RecordingUpstream:
    """A raw TCP upstream: records every request's exact bytes (request line, headers, body)
    and answers each with ``answer`` (default: a small 200 JSON). Keep-alive; loopback only."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.received: list[bytes] = []
        self.answer = answer or (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(OK_JSON), OK_JSON)
        )
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RecordingUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def heads(self) -> list[str]:
        """Each request's head (request line and headers) as text."""
        return [r.split(b"\r\n\r\n", 1)[0].decode("latin-1") for r in self.received]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.received.append(head + body)
                self.arrived.set()
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def recording() -> AsyncIterator[RecordingUpstream]:
    upstream = await RecordingUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()


def request_bytes(
    method: str, target: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """One HTTP/1.1 request exactly as given (the target is not checked or encoded)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
