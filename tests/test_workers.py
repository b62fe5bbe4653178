"""More than one core (issue 13): ``listen.reuse_port``, ``--workers N``, one IAM call across
processes, metrics per process, drain of every worker.

The process tests run ``python -m gateway --workers 2`` in front of a fake cloud served by this
test process; which worker answered is told by ``/healthz``'s ``pid`` on the shared port, and each
worker's own counters by its metrics port (``listen.metrics_port + index``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import (
    GatewayFactory,
    base_config,
    chat_body,
    free_port,
    run_gateway_cli,
    start_gateway_process,
    stop_process,
    wait_healthy,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.load import ConfigError, parse_settings
from gateway.config.model import IamPasswordCredential
from gateway.config.risks import start_up_risks
from gateway.credentials import cache_file
from gateway.server.supervisor import with_shared_cache
from gateway.testing import FakeCloud

WAIT = 10.0  # bound on something another process must do (shared, slow CI machines)
POLL = 0.01  # polling interval where no event can be awaited (another process)
TRIES = 400  # fresh connections tried before concluding one worker never answers


@dataclass
class Workers:
    proc: asyncio.subprocess.Process  # the supervisor
    url: str  # the shared port
    metrics_port: int
    log_path: Path

    def metrics_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.metrics_port + index}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), WAIT)


Spawn = Callable[..., Awaitable[Workers]]


def pair_of_free_ports() -> int:
    """A port P with P + 1 also free (the two workers' metrics ports)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _free(port + 1):
            return port
    raise AssertionError("no two adjacent free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start ``python -m gateway --config F --workers N``; its stderr (all workers') to a file."""
    started: list[asyncio.subprocess.Process] = []

    async def factory(config: dict[str, Any], workers: int = 2, **env: str) -> Workers:
        port, metrics_port = free_port(), pair_of_free_ports()
        config = {
            **config,
            "listen": {**config["listen"], "port": port, "metrics_port": metrics_port},
        }
        path = tmp_path / f"gateway{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = tmp_path / f"gateway{len(started)}.log"
        environ = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        environ.update(env)
        with log_path.open("wb") as log_file:
            proc = await start_gateway_process(
                "--config", str(path), "--workers", str(workers), env=environ, stderr=log_file
            )
        started.append(proc)
        running = Workers(proc, f"http://127.0.0.1:{port}", metrics_port, log_path)
        for index in range(workers):
            await wait_healthy(running.metrics_url(index), proc, log=running.log)
        return running

    try:
        yield factory
    finally:
        for proc in started:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)  # the workers are in sessions of their own
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), WAIT)
            await stop_process(proc)


async def fresh_get(url: str) -> tuple[int, dict[str, Any]]:
    """GET on a new connection (the kernel picks the worker per connection)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def pids_answering(url: str, want: int) -> set[int]:
    """The pids seen on ``url``/healthz over fresh connections, until ``want`` are seen."""
    pids: set[int] = set()
    for _ in range(TRIES):
        status, body = await fresh_get(url + "/healthz")
        assert status == 200
        pids.add(body["pid"])
        if len(pids) >= want:
            break
    return pids


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def run_dir_files(parent: Path) -> tuple[Path, Path]:
    """The supervisor's private run directory under ``parent`` and the token file in it."""
    (run_dir,) = parent.glob("modelarts-gateway-*")
    (token_file,) = run_dir.glob("main-*.json")
    return run_dir, token_file


def parent_of(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


async def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples matching ``labels`` on ``url``/metrics."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Await a condition another process will make true (bounded polling: no event to await)."""
    for _ in range(int(WAIT / POLL)):
        if await predicate():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"timed out waiting until {what}")


async def wait_ready(workers: Workers, count: int = 2) -> None:
    for index in range(count):
        url = workers.metrics_url(index)

        async def ready(url: str = url) -> bool:
            async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as resp:
                return resp.status == 200

        await until(ready, f"worker {index} is ready")


# --- two processes, one port -----------------------------------------------------------------


async def test_two_workers_answer_on_one_port_with_one_iam_call_and_metrics_per_process(
    cloud: FakeCloud, spawn: Spawn, tmp_path: Path
) -> None:
    gw = await spawn(base_config(cloud), RUNTIME_DIRECTORY=str(tmp_path))
    pids = await pids_answering(gw.url, 2)
    assert len(pids) == 2, f"only {pids} answered on the shared port"
    assert all(parent_of(pid) == gw.proc.pid for pid in pids)
    await wait_ready(gw)
    assert cloud.iam.calls == 1, "each credential's token is fetched once for all workers"

    # no cache_file configured: the token is shared through the supervisor's private directory
    run_dir, token_file = run_dir_files(tmp_path)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    sent = 0
    for _ in range(TRIES):  # fresh connections until both workers have proxied a request
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(gw.url + "/v1/chat/completions", json=chat_body(False)) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        sent += 1
        counts = [
            await metric(gw.metrics_url(i), "gateway_requests_total", route="chat") for i in (0, 1)
        ]
        if all(counts):
            break
    assert all(counts), "every worker proxies on the shared port"
    assert sum(counts) == sent, "each worker counts its own requests, on its own metrics port"
    tokens = {r.headers["X-Auth-Token"] for r in cloud.modelarts.requests}
    assert len(tokens) == 1 and cloud.iam.calls == 1

    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code() == 0
    assert not run_dir.exists(), "the private run directory (and its token) is removed at exit"
    assert "Traceback" not in gw.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_drains_every_worker_with_a_stream_in_flight_finishing(
    cloud: FakeCloud, spawn: Spawn, sig: signal.Signals
) -> None:
    config = base_config(cloud)
    config["listen"]["shutdown_grace"] = "20s"
    gw = await spawn(config)
    await wait_ready(gw)
    cloud.modelarts.script.events = 20
    cloud.modelarts.script.interval = 0.1  # about 2 s of stream each
    streams: list[tuple[aiohttp.ClientSession, aiohttp.ClientResponse]] = []
    try:
        for _ in range(TRIES):  # open streams on fresh connections until each worker has one
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            resp = await http.post(gw.url + "/v1/chat/completions", json=chat_body())
            assert resp.status == 200
            await resp.content.readany()
            streams.append((http, resp))
            active = [
                await metric(gw.metrics_url(i), "gateway_active_streams", route="chat")
                for i in (0, 1)
            ]
            if all(active):
                break
        assert all(active), "a stream in flight on each worker"

        gw.proc.send_signal(sig)
        bodies = [await asyncio.wait_for(resp.content.read(), WAIT) for _, resp in streams]
    finally:
        for http, resp in streams:
            resp.release()
            await http.close()
    for body in bodies:
        assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
        assert b"event: error" not in body
    assert await gw.exit_code() == 0
    log = gw.log()
    assert sum(line.endswith("] stopping") for line in log.splitlines()) == 2, log
    assert "Traceback" not in log
    with pytest.raises(aiohttp.ClientConnectorError):
        await fresh_get(gw.url + "/healthz")


async def test_the_supervisor_tells_systemd_ready_once_every_worker_serves(
    cloud: FakeCloud, spawn: Spawn, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        gw = await spawn(base_config(cloud), NOTIFY_SOCKET=str(path))
        message = await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)
        assert message == b"READY=1"
        assert len(await pids_answering(gw.url, 2)) == 2
        gw.proc.send_signal(signal.SIGTERM)
        message = await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)
        assert message == b"STOPPING=1"  # one of each: the workers' own went to the supervisor
        assert await gw.exit_code() == 0
        with pytest.raises(BlockingIOError):
            sock.recv(4096)


async def test_sighup_to_the_supervisor_reloads_every_worker(
    cloud: FakeCloud, spawn: Spawn, tmp_path: Path
) -> None:
    gw = await spawn(base_config(cloud))
    path = tmp_path / "gateway0.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["routes"][0]["max_body"] = "1KiB"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    gw.proc.send_signal(signal.SIGHUP)

    async def both_reloaded() -> bool:
        return gw.log().count("config reloaded (SIGHUP)") == 2

    await until(both_reloaded, "both workers reloaded")
    assert len(await pids_answering(gw.url, 2)) == 2, "both workers still serve"
    big = chat_body(False, messages=[{"role": "user", "content": "x" * 2000}])
    for _ in range(TRIES):  # fresh connections until each worker has refused one
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(gw.url + "/v1/chat/completions", json=big) as resp,
        ):
            assert resp.status == 413  # the new max_body, whichever worker answered
        refused = [
            await metric(gw.metrics_url(i), "gateway_rejected_total", reason="request_too_large")
            for i in (0, 1)
        ]
        if all(refused):
            break
    assert all(refused), "each worker applies the reloaded config"
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code() == 0


async def test_with_port_0_every_worker_gets_the_port_the_supervisor_picked(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config(cloud)), encoding="utf-8")  # listen.port: 0
    log_path = tmp_path / "gateway.log"
    environ = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with log_path.open("wb") as log_file:
        proc = await start_gateway_process(
            "--config", str(path), "--workers", "2", env=environ, stderr=log_file
        )
    try:

        async def both_serving() -> bool:
            return log_path.read_text().count("serving on http://127.0.0.1:") == 2

        await until(both_serving, "both workers serve")
        ports = set(re.findall(r"serving on http://127\.0\.0\.1:(\d+)", log_path.read_text()))
        (port,) = ports  # one port for both
        assert int(port) > 0
        pids = await pids_answering(f"http://127.0.0.1:{port}", 2)
        assert len(pids) == 2
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        await stop_process(proc)


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    cloud: FakeCloud, spawn: Spawn
) -> None:
    gw = await spawn(base_config(cloud))
    pids = await pids_answering(gw.url, 2)
    assert len(pids) == 2
    gw.proc.kill()  # no signal to forward: the workers notice the pipe's EOF
    await gw.proc.wait()

    async def gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await until(gone, "the orphaned workers exited")


async def test_a_worker_dying_stops_the_others_and_the_supervisor_exits_1(
    cloud: FakeCloud, spawn: Spawn
) -> None:
    gw = await spawn(base_config(cloud))
    pids = sorted(await pids_answering(gw.url, 2))
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    assert await gw.exit_code() == 1
    assert not alive(pids[1]), "the other worker was stopped and reaped"
    assert "exited with code -9; stopping the others" in gw.log()


# --- one IAM call per refresh, across processes sharing a cache_file ------------------------


async def test_processes_sharing_a_cache_file_make_one_iam_call_per_refresh(
    cloud: FakeCloud, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "main.json"

    def shared(config: dict[str, Any]) -> None:
        config["credentials"]["main"]["cache_file"] = str(path)

    url = "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:

        async def token_used(gw_url: str) -> str:
            async with http.post(gw_url + url, json=chat_body(False)) as resp:
                assert resp.status == 200
                await resp.read()
            token: str = cloud.modelarts.requests[-1].headers["X-Auth-Token"]
            return token

        t1 = await token_used((await make_gateway(shared)).url)  # writes the file
        assert cloud.iam.calls == 1
        # the file's token now expires in 200 s: inside refresh_margin (300 s), still usable
        entry = json.loads(path.read_text())
        entry["expires_at"] = time.time() + 200
        path.write_text(json.dumps(entry))
        first, second = await make_gateway(shared), await make_gateway(shared)  # both seed t1
        assert cloud.iam.calls == 1

        async def refreshed(gw_url: str) -> bool:
            return await token_used(gw_url) != t1

        await until(lambda: refreshed(first.url), "the first gateway refreshed")
        assert cloud.iam.calls == 2
        t2 = await token_used(first.url)
        await until(lambda: refreshed(second.url), "the second gateway refreshed")
        assert await token_used(second.url) == t2, "the second adopted the first one's token"
    assert cloud.iam.calls == 2, "one IAM call for the refresh, not one per process"


async def test_a_token_refused_upstream_is_never_adopted_back_from_the_shared_file(
    cloud: FakeCloud, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    path = tmp_path / "main.json"

    def shared(config: dict[str, Any]) -> None:
        config["credentials"]["main"]["cache_file"] = str(path)

    gw = await make_gateway(shared)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body(False)) as resp:
            assert resp.status == 200
        cloud.iam.revoke_all()  # the file's token is now refused by the upstream
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body(False)) as resp:
            assert resp.status == 200  # 401, fresh token from IAM (not the file's), replayed
    assert cloud.iam.calls == 2
    assert cloud.modelarts.unauthorized == 1


# --- the fetch lock beside a shared cache_file: a dead holder, a stuck one -------------------


def lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


async def fetch_waiting(logs: pytest.LogCaptureFixture) -> bool:
    """Whether the in-process gateway's fetch has found the lock held (its debug line)."""
    return any("another process is fetching a token" in r.getMessage() for r in logs.records)


async def chat_status(url: str) -> int:
    """The status of one non-streaming completion through the gateway at ``url`` (bounded)."""
    async with (
        asyncio.timeout(WAIT),
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json=chat_body(False)) as resp,
    ):
        await resp.read()
        return resp.status


def held_over(logs: pytest.LogCaptureFixture) -> list[str]:
    return [m for r in logs.records if "fetching anyway" in (m := r.getMessage())]


async def test_a_holder_killed_mid_fetch_releases_the_lock_and_the_waiting_gateway_fetches(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "main.json"
    config = base_config(cloud)
    config["credentials"]["main"]["cache_file"] = str(path)
    config["listen"]["port"] = free_port()
    config_path = tmp_path / "holder.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cloud.iam.delay = 3600.0  # the holder's IAM call never answers: it holds the lock
    holder = await start_gateway_process("--config", str(config_path), env=dict(os.environ))
    try:

        async def holder_in_iam() -> bool:
            # a request recorded is one sleeping in the fake (no await between the two)
            return len(cloud.iam.requests) == 1

        await until(holder_in_iam, "the holder called IAM")
        cloud.iam.delay = 0.0
        gw = await make_gateway(lambda c: c["credentials"]["main"].update(cache_file=str(path)))
        await until(lambda: fetch_waiting(captured_logs), "the gateway waits for the lock")
        assert cloud.iam.calls == 1, "the waiting gateway does not call IAM meanwhile"
        holder.kill()  # SIGKILL mid-fetch: no cleanup runs, the kernel closes its descriptors
        await holder.wait()
        assert await chat_status(gw.url) == 200
    finally:
        await stop_process(holder)
    assert cloud.iam.calls == 2, "the dead holder's unanswered call and the waiter's own"
    assert not held_over(captured_logs), "the lock was released, not waited out"
    assert (
        json.loads(path.read_text())["token"]
        == cloud.modelarts.requests[-1].headers["X-Auth-Token"]
    ), "the waiter wrote the token it fetched"


HOLD_FOREVER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin or kills it
"""


def test_the_lock_wait_is_45_s_by_default() -> None:
    assert cache_file.LOCK_WAIT == 45.0, "README: one stuck over 45 s is not waited for"


async def test_a_holder_stuck_on_the_lock_is_not_waited_for_beyond_the_bound(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    captured_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_file, "LOCK_WAIT", 0.3)  # the bound, lowered from 45 s
    path = tmp_path / "main.json"
    stuck = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_FOREVER,
        str(lock_file(path)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert stuck.stdout is not None
        assert await asyncio.wait_for(stuck.stdout.readline(), WAIT) == b"locked\n"
        start = time.monotonic()
        gw = await make_gateway(lambda c: c["credentials"]["main"].update(cache_file=str(path)))
        assert await chat_status(gw.url) == 200
        waited = time.monotonic() - start
        assert stuck.returncode is None, "the holder still holds the lock"
    finally:
        await stop_process(stuck)
    assert waited >= 0.3, "the lock was waited for, up to the bound"
    assert cloud.iam.calls == 1, "the gateway made its own IAM call"
    (warning,) = held_over(captured_logs)
    assert "is held over 0.3 s" in warning


# --- config and command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ({"reuse_port": "yes"}, "listen.reuse_port: must be true or false"),
        ({"metrics_port": 70000}, "listen.metrics_port: must be >= 1 and <= 65535"),
        ({"metrics_port": "x"}, "listen.metrics_port: must be a whole number"),
        ({"port": 9000, "metrics_port": 9000}, "listen.metrics_port: must differ from"),
    ],
)
def test_bad_reuse_port_or_metrics_port_names_the_key(
    cloud: FakeCloud, listen: dict[str, Any], problem: str
) -> None:
    config = base_config(cloud)
    config["listen"].update(listen)
    with pytest.raises(ConfigError) as caught:
        parse_settings(config, {})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_reuse_port_and_metrics_port_parse(cloud: FakeCloud) -> None:
    config = base_config(cloud)
    config["listen"].update({"reuse_port": True, "metrics_port": 9100})
    listen = parse_settings(config, {}).listen
    assert listen.reuse_port is True and listen.metrics_port == 9100
    assert parse_settings(base_config(cloud), {}).listen.reuse_port is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2", "--worker-index", "1"], "--worker-index is for one process"),
        (["--worker-index", "-1"], "--worker-index must be >= 0"),
    ],
)
def test_bad_worker_flags_exit_2(
    cloud: FakeCloud, tmp_path: Path, args: list[str], message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(cloud)), encoding="utf-8")
    result = run_gateway_cli("--config", str(path), *args, env=dict(os.environ))
    assert result.returncode == 2
    assert message in result.stderr


def test_metrics_port_plus_worker_index_over_65535_exits_2(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    config = base_config(cloud)
    config["listen"]["metrics_port"] = 65535
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_gateway_cli("--config", str(path), "--workers", "2", env=dict(os.environ))
    assert result.returncode == 2
    assert "listen.metrics_port 65535 + worker index 1 is over 65535" in result.stderr


def test_reuse_port_without_a_shared_cache_file_is_warned_about(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    config = base_config(cloud)
    config["listen"]["reuse_port"] = True
    (risk,) = start_up_risks(parse_settings(config, {}))
    assert risk.startswith("listen.reuse_port is on and credentials.main has no cache_file")
    config["credentials"]["main"]["cache_file"] = str(tmp_path / "main.json")
    assert start_up_risks(parse_settings(config, {})) == []
    # what a --workers supervisor hands its workers: a cache_file in its private directory
    shared = with_shared_cache(parse_settings(base_config(cloud), {}), tmp_path)
    main = shared.credentials["main"]
    assert isinstance(main, IamPasswordCredential) and main.cache_file is not None
    assert main.cache_file.parent == tmp_path


def test_reuse_port_with_per_key_limits_counted_in_memory_is_warned_about(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    config = base_config(cloud)
    config["credentials"]["main"]["cache_file"] = str(tmp_path / "main.json")
    config["listen"]["reuse_port"] = True
    config["listen"]["api_keys"] = [
        {"name": "alice", "key": "sk-alice-workers-0123456789", "requests_per_minute": 10},
        {"name": "bob", "key": "sk-bob-workers-0123456789ab"},
    ]
    (risk,) = start_up_risks(parse_settings(config, {}))
    assert risk.startswith("listen.reuse_port is on and limits_store.type is memory")
    assert "'alice'" in risk and "'bob'" not in risk
    config["limits_store"] = {"type": "redis", "url": "redis://127.0.0.1:6379/0"}
    assert start_up_risks(parse_settings(config, {})) == []
