"""Operating the gateway (issue 3): /metrics, /readyz, drain on SIGTERM, systemd notify, access log.

The in-process tests use the conftest gateway; the lifecycle tests run ``python -m gateway`` in a
subprocess (config written to tmp_path, port chosen at run time) in front of a fake cloud served
by this test process, with the subprocess's stderr captured to a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import (
    MODEL,
    GatewayFactory,
    RunningGateway,
    base_config,
    chat_body,
    free_port,
    start_gateway,
    start_gateway_process,
    stop_process,
    wait_healthy,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.load import parse_settings
from gateway.metrics import STREAM_END_REASONS
from gateway.server.run import drain
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud, start_fake_cloud

WAIT = 5.0  # bound on awaiting something that must happen (shared, slow CI machines)
EXIT_WAIT = 10.0  # bound on a subprocess exiting after a signal
POLL = 0.01  # polling interval where no event can be awaited (another process, a fake's list)

ALICE_KEY = "sk-alice-ops-4c9e1f7a"
BOB_KEY = "sk-bob-ops-8d2b6e30a1"

# gateway_<noun>_<unit> names promised by issue 3, with the sample each must export
ISSUE_METRICS = {
    "gateway_requests_total": "gateway_requests_total",
    "gateway_request_duration_seconds": "gateway_request_duration_seconds_count",
    "gateway_time_to_first_byte_seconds": "gateway_time_to_first_byte_seconds_count",
    "gateway_active_streams": "gateway_active_streams",
    "gateway_stream_chunk_gap_seconds": "gateway_stream_chunk_gap_seconds_count",
    "gateway_stream_end_total": "gateway_stream_end_total",
    "gateway_relayed_bytes_total": "gateway_relayed_bytes_total",
    "gateway_heartbeats_total": "gateway_heartbeats_total",
    "gateway_token_refreshes_total": "gateway_token_refreshes_total",
    "gateway_token_expiry_timestamp_seconds": "gateway_token_expiry_timestamp_seconds",
    "gateway_rejected_total": "gateway_rejected_total",
    "gateway_key_requests_total": "gateway_key_requests_total",
    "gateway_upstream_connections": "gateway_upstream_connections",  # issue 9
}

ACCESS_KEYS = (
    "request_id",
    "key",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes",
    "end",
    "prompt_tokens",
    "completion_tokens",
)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Await a condition another task or process will make true (bounded polling, no fixed wait)."""
    for _ in range(int(WAIT / POLL)):
        if predicate():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"timed out waiting until {what}")


def with_keys(config: dict[str, Any]) -> None:
    config["listen"]["api_keys"] = [
        {"name": "alice", "key": ALICE_KEY},
        {"name": "bob", "key": BOB_KEY},
    ]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def scrape(http: aiohttp.ClientSession, gw_url: str) -> str:
    async with http.get(gw_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url + "/readyz") as resp:
        return resp.status, await resp.text()


# --- /metrics ------------------------------------------------------------------------------------


async def test_metrics_exposes_every_metric_name_of_the_issue_after_traffic(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        with_keys(config)
        config["routes"][0]["heartbeat"] = "20ms"

    gw = await make_gateway(edit)
    cloud.modelarts.script.events = 2
    cloud.modelarts.script.interval = 0.1  # upstream silence: heartbeats go out
    async with http.post(
        gw.url + "/v1/chat/completions", json=chat_body(), headers=bearer(ALICE_KEY)
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b": keep-alive\n\n" in body
    async with http.get(gw.url + "/nowhere", headers=bearer(ALICE_KEY)) as resp:
        assert resp.status == 404

    text = await scrape(http, gw.url)
    names = {name for name, _, _ in samples(text)}
    for metric, sample in ISSUE_METRICS.items():
        assert f"# TYPE {metric} " in text, metric
        assert sample in names, f"{metric} has no sample after traffic"
    assert gw.metric("gateway_heartbeats_total", route="chat") >= 1


async def test_metric_values_follow_the_traffic(
    gateway: RunningGateway, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 3
    cloud.modelarts.script.interval = 0.05
    received = 0
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        first = await resp.content.readany()
        assert gateway.metric("gateway_active_streams", route="chat") == 1
        rest = await resp.content.read()
        received += len(first) + len(rest)
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    assert gateway.metric("gateway_active_streams", route="chat") == 0

    cloud.modelarts.script.interval = 0.0
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(False)) as resp:
        assert resp.status == 200
        received += len(await resp.read())

    m = gateway.metric
    assert m("gateway_requests_total", route="chat", status="200") == 2
    assert m("gateway_request_duration_seconds_count", route="chat") == 2
    assert m("gateway_time_to_first_byte_seconds_count", route="chat") == 2
    assert m("gateway_stream_end_total", route="chat", reason="done") == 2
    assert m("gateway_relayed_bytes_total", route="chat") == received
    assert m("gateway_stream_chunk_gap_seconds_count", route="chat") >= 5
    assert m("gateway_token_refreshes_total", credential="main", result="ok") == 1
    expiry = m("gateway_token_expiry_timestamp_seconds", credential="main")
    assert time.time() + 3600 < expiry <= time.time() + 86400 + 60

    # and the same numbers on the wire
    text = await scrape(http, gateway.url)
    assert 'gateway_requests_total{route="chat",status="200"} 2.0' in text
    assert f'gateway_relayed_bytes_total{{route="chat"}} {float(received)}' in text


async def test_stream_cut_by_the_upstream_counts_an_upstream_error_end(
    gateway: RunningGateway, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.reset_after = 2
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        body = await resp.read()
    assert b'"code": "upstream_error"' in body
    assert gateway.metric("gateway_stream_end_total", route="chat", reason="upstream_error") == 1
    assert gateway.metric("gateway_active_streams", route="chat") == 0


WEIRD = "zzweird"


async def test_metric_labels_never_come_from_a_client_path_or_model(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        with_keys(config)
        chat = config["routes"][0]
        chat["models"] = [MODEL]
        config["routes"] += [
            {**chat, "name": "other", "models": []},  # fallback on /v1: any model goes upstream
            {**chat, "name": "embed", "path": "/v2", "models": ["embed-model"]},
        ]

    gw = await make_gateway(edit)
    key = bearer(ALICE_KEY)
    requests: list[tuple[str, str, Any, dict[str, str]]] = [
        ("POST", "/v1/chat/completions", chat_body(model=f"{WEIRD}-model-1"), key),
        ("POST", "/v1/chat/completions", chat_body(False, model=f"{WEIRD}-model-2"), key),
        ("POST", "/v2/chat/completions", chat_body(model=f"{WEIRD}-model-3"), key),
        ("POST", f"/v1/{WEIRD}/path?{WEIRD}=1", chat_body(), key),
        ("GET", f"/{WEIRD}-top/level", None, key),
        ("GET", f"/v1/%2e%2e/{WEIRD}", None, key),
        ("POST", "/v1/chat/completions", chat_body(), bearer(f"sk-{WEIRD}")),
        ("POST", "/v1/chat/completions", chat_body(model=MODEL), {**key, "X-Request-Id": WEIRD}),
        (WEIRD.upper(), "/v1/chat/completions", None, key),
        ("POST", "/v1/chat/completions", {"model": ["not", "a", WEIRD]}, key),
    ]
    statuses = []
    for method, path, body, headers in requests:
        async with http.request(method, gw.url + path, json=body, headers=headers) as resp:
            await resp.read()
            statuses.append(resp.status)
    assert 200 in statuses and 401 in statuses and 404 in statuses and 400 in statuses

    text = await scrape(http, gw.url)
    assert WEIRD not in text.lower()
    config_names = {"chat", "other", "embed", "main", "alice", "bob", "-"}
    enum_value = re.compile(r"^[a-z_]{1,40}$")
    seen: dict[str, set[str]] = {}
    for _, labels, _ in samples(text):
        for label, value in labels.items():
            seen.setdefault(label, set()).add(value)
    seen.pop("le", None)
    assert seen["route"] <= {"chat", "other", "embed", "-"}
    assert seen["key"] <= {"alice", "bob"}
    assert seen["credential"] <= {"main"}
    assert all(re.fullmatch(r"[1-5]\d\d", s) for s in seen["status"]), seen["status"]
    assert seen["reason"] >= {"route_not_found", "model_not_found", "invalid_api_key"}
    assert all(enum_value.fullmatch(r) for r in seen["reason"]), seen["reason"]
    stream_ends = {
        lab["reason"] for n, lab, _ in samples(text) if n.startswith("gateway_stream_end")
    }
    assert "done" in stream_ends and stream_ends <= set(STREAM_END_REASONS)
    assert seen["result"] <= {"ok", "error", "rejected"}
    # issue 11: tokens by the configured model name ("-" on a route without models)
    assert "-" in seen["model"] and seen["model"] <= {MODEL, "embed-model", "-"}
    assert seen["kind"] <= {"prompt", "completion"}
    assert seen["state"] <= {"idle", "active"}
    labels = {"route", "status", "reason", "result", "key", "credential", "state", "model", "kind"}
    assert set(seen) <= labels
    assert seen["route"] | seen["key"] | seen["credential"] <= config_names


# --- /readyz ------------------------------------------------------------------------------------


async def test_readyz_is_200_once_the_credential_has_a_token(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body(False)) as resp:
        assert resp.status == 200
    status, text = await readyz(http, gateway.url)
    assert status == 200, text
    assert json.loads(text) == {"status": "ready"}


async def test_readyz_is_503_naming_the_credential_while_iam_fails(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.iam.failures = [503] * 10
    gw = await make_gateway()
    await until(lambda: cloud.iam.calls >= 1, "the gateway asked IAM for a token")
    for _ in range(int(WAIT / POLL)):  # until the failed fetch is reported, not "no token yet"
        status, text = await readyz(http, gw.url)
        assert status == 503
        if "HTTP 503" in text:
            break
        await asyncio.sleep(POLL)
    body = json.loads(text)
    assert body["status"] == "not ready"
    (problem,) = body["problems"]
    assert "'main'" in problem and "HTTP 503" in problem
    assert cloud.iam.password not in text
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="error") >= 1


async def test_readyz_is_503_with_a_wrong_password_and_never_shows_it(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    wrong = "Wr0ng-Passw0rd-e5a1"
    gw = await make_gateway(lambda c: c["credentials"]["main"].update(password=wrong))
    await until(lambda: cloud.iam.calls == 1, "the gateway asked IAM for a token")
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(False)) as resp:
        assert resp.status == 502
        error_text = await resp.text()
    assert "credential_unavailable" in error_text
    status, text = await readyz(http, gw.url)
    assert status == 503
    assert "'main'" in text and "refused" in text
    for shown in (text, error_text):
        assert wrong not in shown and cloud.iam.password not in shown
    assert cloud.iam.calls == 1, "a rejected password is not retried in a tight loop"
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="rejected") == 1
    assert cloud.modelarts.requests == []


async def test_drain_readyz_503_refuses_new_connections_and_lets_the_stream_finish(
    cloud: FakeCloud,
) -> None:
    settings = parse_settings(base_config(cloud), {})
    gw = await start_gateway(settings)
    cloud.modelarts.script.events = 6
    cloud.modelarts.script.interval = 0.05
    drained: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as kept:
            assert (await readyz(kept, gw.url))[0] in (200, 503)  # leaves a pooled connection
            async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
                first = await resp.content.readany()
                drained = asyncio.create_task(drain(gw.runner, 5.0, asyncio.Event()))
                status, text = await readyz(kept, gw.url)  # on the kept-alive connection
                assert status == 503
                assert json.loads(text) == {"status": "draining"}
                assert gw.app[GATEWAY].proxy.draining
                async with aiohttp.ClientSession() as fresh:
                    with pytest.raises(aiohttp.ClientConnectorError):
                        await fresh.get(gw.url + "/healthz")
                rest = await resp.content.read()
            assert (first + rest).endswith(b"data: [DONE]\n\n")
            assert b"event: error" not in rest
        await asyncio.wait_for(drained, WAIT)
        assert gw.metric("gateway_stream_end_total", route="chat", reason="done") == 1
    finally:
        if drained is None or not drained.done():
            if drained is not None:
                drained.cancel()
            await gw.runner.cleanup()


# --- the real process: signals, drain, systemd, access log ---------------------------------------


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str
    log_path: Path

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), EXIT_WAIT)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8")


Spawn = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start ``python -m gateway --config F`` on a free loopback port; stderr goes to a file."""
    started: list[asyncio.subprocess.Process] = []

    async def factory(
        config: dict[str, Any],
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> GatewayProcess:
        port = free_port()
        config = {**config, "listen": {**config["listen"], "host": "127.0.0.1", "port": port}}
        n = len(started)
        path = tmp_path / f"gateway{n}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = tmp_path / f"gateway{n}.log"
        environ = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        environ.update(env or {})
        with log_path.open("wb") as log_file:
            proc = await start_gateway_process(
                "--config", str(path), *args, env=environ, stderr=log_file
            )
        started.append(proc)
        running = GatewayProcess(proc, f"http://127.0.0.1:{port}", log_path)
        if wait:
            await wait_healthy(running.url, proc, log=running.log)
        return running

    try:
        yield factory
    finally:
        for proc in started:
            await stop_process(proc)


async def wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    """Poll /readyz until the first token is there (bounded)."""
    for _ in range(int(WAIT / POLL)):
        if (await readyz(http, url))[0] == 200:
            return
        await asyncio.sleep(POLL)
    raise AssertionError("the gateway did not become ready")


async def refused(url: str) -> None:
    """Poll with fresh connections until the listener refuses one (it stops soon after a signal)."""
    async with (
        asyncio.timeout(WAIT),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
    ):
        while True:
            try:
                async with fresh.get(url + "/healthz") as resp:
                    await resp.read()
            except aiohttp.ClientConnectorError:
                return
            except aiohttp.ClientConnectionError:
                pass  # accepted just before the listener closed
            await asyncio.sleep(0.01)


def last_event(body: bytes) -> tuple[str | None, dict[str, Any] | str]:
    """The last SSE event of ``body``: (event name, parsed data)."""
    event = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].decode()
    name, data = None, ""
    for line in event.splitlines():
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data = value
    try:
        return name, json.loads(data)
    except ValueError:
        return name, data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_lets_a_running_stream_finish_refuses_new_connections_and_exits_0(
    cloud: FakeCloud, spawn: Spawn, sig: signal.Signals
) -> None:
    config = base_config(cloud)
    config["listen"]["shutdown_grace"] = "20s"
    gw = await spawn(config)
    cloud.modelarts.script.events = 20
    cloud.modelarts.script.interval = 0.1  # about 2 s of stream
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as kept:
        await wait_ready(kept, gw.url)  # also leaves a kept-alive connection in the pool
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            gw.send(sig)
            await refused(gw.url)
            assert gw.proc.returncode is None, "the process waits for the stream"
            status, text = await readyz(kept, gw.url)  # the kept-alive connection still works
            assert status == 503 and "draining" in text
            rest = await resp.content.read()
    body = first + rest
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"event: error" not in body
    assert body.count(b"data: ") == 20 + 3  # role, 20 contents, finish, [DONE]
    assert await gw.exit_code() == 0
    log = gw.log()
    assert "Traceback" not in log
    assert "stopping" in log


async def test_stream_open_after_shutdown_grace_ends_with_a_shutdown_error_event(
    cloud: FakeCloud, spawn: Spawn
) -> None:
    config = base_config(cloud)
    config["listen"]["shutdown_grace"] = "500ms"
    gw = await spawn(config)
    cloud.modelarts.script.events = 400
    cloud.modelarts.script.interval = 0.05  # 20 s of stream
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, gw.url)
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            signalled = time.monotonic()
            gw.send(signal.SIGTERM)
            rest = await asyncio.wait_for(resp.content.read(), WAIT)
            cut = time.monotonic() - signalled
        code = await gw.exit_code()
        exited = time.monotonic() - signalled
    body = first + rest
    name, data = last_event(body)
    assert name == "error", body[-300:]
    assert isinstance(data, dict)
    assert data["error"]["code"] == "shutdown"
    assert b"[DONE]" not in body
    assert 0.4 <= cut < 3.0, f"the stream was cut {cut:.2f} s after the signal"
    assert code == 0
    assert exited < 4.0, f"exit took {exited:.2f} s"
    await until(lambda: cloud.modelarts.open_streams == 0, "the upstream stream was closed")
    assert cloud.modelarts.disconnects == 1
    assert "Traceback" not in gw.log()


async def test_a_second_signal_skips_the_rest_of_the_grace(cloud: FakeCloud, spawn: Spawn) -> None:
    config = base_config(cloud)
    config["listen"]["shutdown_grace"] = "30s"  # far longer than the test may wait
    gw = await spawn(config)
    cloud.modelarts.script.events = 400
    cloud.modelarts.script.interval = 0.05  # 20 s of stream
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, gw.url)
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            first = await resp.content.readany()
            gw.send(signal.SIGTERM)
            await refused(gw.url)  # the first signal is being handled: draining
            more = await resp.content.readany()
            assert more and b"event: error" not in more, "the stream runs on in the grace"
            signalled = time.monotonic()
            gw.send(signal.SIGTERM)
            rest = await asyncio.wait_for(resp.content.read(), WAIT)
            cut = time.monotonic() - signalled
        code = await gw.exit_code()
    name, data = last_event(first + more + rest)
    assert name == "error" and isinstance(data, dict)
    assert data["error"]["code"] == "shutdown"
    assert cut < 5.0, f"the second signal cut the stream only after {cut:.2f} s"
    assert code == 0
    assert "Traceback" not in gw.log()


async def test_systemd_notify_ready_after_listening_and_stopping_on_sigterm(
    cloud: FakeCloud, spawn: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        gw = await spawn(base_config(cloud), env={"NOTIFY_SOCKET": str(path)}, wait=False)
        message = await asyncio.wait_for(loop.sock_recv(sock, 4096), EXIT_WAIT)
        assert message == b"READY=1"
        async with (  # READY=1 means it listens now: no polling
            aiohttp.ClientSession() as http,
            http.get(gw.url + "/healthz") as resp,
        ):
            assert resp.status == 200
        gw.send(signal.SIGTERM)
        message = await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)
        assert message == b"STOPPING=1"
        assert await gw.exit_code() == 0


def access_session_config(cloud: FakeCloud) -> dict[str, Any]:
    config = base_config(cloud)
    with_keys(config)
    config["routes"][0]["models"] = [MODEL]
    return config


# (method, path, body, headers, expected status); X-Request-Id is added per request
ACCESS_REQUESTS: list[tuple[str, str, Any, dict[str, str], int]] = [
    ("POST", "/v1/chat/completions", chat_body(), bearer(ALICE_KEY), 200),
    ("POST", "/v1/chat/completions", chat_body(False), bearer(BOB_KEY), 200),
    ("POST", "/v1/chat/completions", chat_body(), {}, 401),
    ("GET", "/nowhere", None, bearer(ALICE_KEY), 404),
    ("POST", "/v1/chat/completions", chat_body(model="no-such-model"), bearer(BOB_KEY), 404),
    ("GET", "/v1/models", None, bearer(ALICE_KEY), 200),
]


async def run_access_requests(url: str) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as http:
        for i, (method, path, body, headers, expected) in enumerate(ACCESS_REQUESTS):
            rid = f"access-{i}"
            ids.append(rid)
            async with http.request(
                method, url + path, json=body, headers={**headers, "X-Request-Id": rid}
            ) as resp:
                await resp.read()
                assert resp.status == expected, (path, resp.status)
    return ids


async def test_access_log_has_one_text_line_per_request_with_every_field(
    cloud: FakeCloud, spawn: Spawn
) -> None:
    gw = await spawn(access_session_config(cloud))
    ids = await run_access_requests(gw.url)
    gw.send(signal.SIGTERM)
    assert await gw.exit_code() == 0

    lines = [line for line in gw.log().splitlines() if " gateway.access " in line]
    assert len(lines) == len(ACCESS_REQUESTS), "\n".join(lines)
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3} INFO gateway\.access ")
    by_id: dict[str, dict[str, str]] = {}
    for line in lines:
        assert stamp.match(line), line
        rid = line.split("[", 1)[1].split("]", 1)[0]
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert set(ACCESS_KEYS[1:]) <= set(fields), line
        by_id[rid] = fields
    assert sorted(by_id) == sorted(ids)

    stream = by_id["access-0"]
    assert stream["key"] == "alice" and stream["method"] == "POST"
    assert stream["path"] == "/v1/chat/completions" and stream["route"] == "chat"
    assert stream["status"] == "200" and stream["end"] == "done"
    assert float(stream["duration_ms"]) >= float(stream["ttfb_ms"]) >= 0
    assert int(stream["bytes"]) > 0
    assert stream["prompt_tokens"] == stream["completion_tokens"] == "-"  # it asked for none
    assert by_id["access-1"]["key"] == "bob"
    assert by_id["access-1"]["prompt_tokens"].isdigit()  # the JSON answer's usage
    assert by_id["access-1"]["completion_tokens"].isdigit()
    unauthorized = by_id["access-2"]
    assert unauthorized["status"] == "401" and unauthorized["key"] == "-"
    assert unauthorized["ttfb_ms"] == "-"
    assert by_id["access-3"]["status"] == "404" and by_id["access-3"]["route"] == "-"
    assert by_id["access-4"]["status"] == "404"
    assert by_id["access-5"]["status"] == "200" and by_id["access-5"]["key"] == "alice"


async def test_access_log_json_lines_have_every_field(cloud: FakeCloud, spawn: Spawn) -> None:
    gw = await spawn(access_session_config(cloud), "--log-format", "json")
    ids = await run_access_requests(gw.url)
    gw.send(signal.SIGTERM)
    assert await gw.exit_code() == 0

    entries = [json.loads(line) for line in gw.log().splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "gateway.access"]
    assert len(access) == len(ACCESS_REQUESTS)
    assert sorted(e["request_id"] for e in access) == sorted(ids)
    for entry in access:
        assert set(ACCESS_KEYS) | {"time", "level"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert isinstance(entry["status"], int) and isinstance(entry["bytes"], int)
        assert isinstance(entry["duration_ms"], float | int)
    first = next(e for e in access if e["request_id"] == "access-0")
    assert first["key"] == "alice" and first["route"] == "chat" and first["end"] == "done"
    assert first["prompt_tokens"] == "-"
    second = next(e for e in access if e["request_id"] == "access-1")
    assert isinstance(second["prompt_tokens"], int) and isinstance(second["completion_tokens"], int)
    assert {e["level"] for e in entries} <= {"debug", "info", "warning", "error"}


# --- a whole session, then grep the log for every secret ---------------------------------------


IAM_PASSWORD = "iam-Pa55-w0rd-7c1d93"


@pytest.fixture
async def secret_cloud() -> AsyncIterator[FakeCloud]:
    fake = await start_fake_cloud(password=IAM_PASSWORD)
    try:
        yield fake
    finally:
        await fake.close()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_whole_session_never_logs_a_secret(
    secret_cloud: FakeCloud, spawn: Spawn, fmt: str
) -> None:
    cloud = secret_cloud
    config = access_session_config(cloud)
    config["routes"][0]["max_body"] = "16KiB"
    config["routes"][0]["max_concurrency"] = 1
    gw = await spawn(config, "--log-level", "debug", "--log-format", fmt)
    wrong_key = "sk-wrong-b81f0c44a2"
    client_token = "client-x-auth-token-6f2e91"
    url = gw.url + "/v1/chat/completions"
    script = cloud.modelarts.script

    async with aiohttp.ClientSession() as http:

        async def call(
            body: Any = None, *, key: str | None = ALICE_KEY, path: str = url, **headers: str
        ) -> tuple[int, bytes]:
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            async with http.post(path, json=body or chat_body(), headers=headers) as resp:
                return resp.status, await resp.read()

        status, body = await call()
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert (await call(chat_body(False), key=BOB_KEY))[0] == 200
        assert (await call(key=None))[0] == 401
        assert (await call(key=wrong_key))[0] == 401
        assert (await call(key=None, Authorization=f"Basic {wrong_key}"))[0] == 401
        assert (await call(**{"X-Auth-Token": client_token}))[0] == 200
        assert (await call(path=f"{url}?api_key={wrong_key}"))[0] == 200
        big = chat_body(messages=[{"role": "user", "content": "x" * 20_000}])
        assert (await call(big))[0] == 413
        assert (await call(chat_body(model="unknown")))[0] == 404

        script.status = 500
        assert (await call())[0] == 500
        script.status = None
        script.reset_after = 2
        status, body = await call()
        assert status == 200 and b"upstream_error" in body
        script.reset_after = None

        cloud.iam.revoke_all()  # the cached token now gets a 401: refresh and replay once
        status, body = await call()
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")

        script.header_delay = 1.0  # hold the only slot of the route: the next one gets 429
        sent = len(cloud.modelarts.requests)
        held = asyncio.create_task(call(chat_body(False)))
        await until(lambda: len(cloud.modelarts.requests) > sent, "the held request went up")
        script.header_delay = 0.0
        assert (await call(chat_body(False), key=BOB_KEY))[0] == 429
        assert (await held)[0] == 200

    gw.send(signal.SIGTERM)
    assert await gw.exit_code() == 0
    log = gw.log()

    tokens = {r.headers["X-Auth-Token"] for r in cloud.modelarts.requests}
    assert len(tokens) >= 2, "the session used the first token and the one fetched after 401"
    assert cloud.modelarts.unauthorized >= 1
    assert "replaying" in log
    assert log.count("gateway.access") >= 14
    secrets = {
        ALICE_KEY,
        BOB_KEY,
        wrong_key,
        f"Bearer {ALICE_KEY}",
        f"Basic {wrong_key}",
        IAM_PASSWORD,
        client_token,
        *tokens,
    }
    for secret in secrets:
        assert secret not in log, f"a secret ({secret[:6]}...) is in the log"
    assert "Traceback" not in log
