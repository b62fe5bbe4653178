"""Shared fixtures: the fake cloud and the real gateway, both on loopback sockets."""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config.load import parse_settings
from gateway.config.model import Settings
from gateway.metrics import Metrics
from gateway.server.app import build_app, make_runner
from gateway.server.state import METRICS
from gateway.testing import FakeCloud, start_fake_cloud

MODEL = "qwen2-7b"


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
