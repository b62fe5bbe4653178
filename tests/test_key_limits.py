"""Limits per API key (issue 11, items 2 and 3): per minute, per day, concurrency, Redis.

Every limit is driven through the real gateway on loopback in front of the fake cloud, with
each store: ``memory`` and a real ``redis-server`` started per test on a free port. The
fake's non-streaming answer reports ``usage`` of 1 prompt token ("Hi") plus one completion
token per scripted event, so each request here costs exactly ``TOKENS``.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import itertools
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import (
    GatewayFactory,
    RunningGateway,
    base_config,
    chat_body,
    free_port,
    open_raw,
    read_answer,
    request_bytes,
    start_gateway_process,
    stop_process,
    wait_healthy,
)
from redis_server import RedisServer

from gateway.config.load import ConfigError, parse_settings
from gateway.config.model import ApiKey, KeyLimits, LimitsStore, Secret
from gateway.limits import Refusal
from gateway.limits.memory import MemoryStore
from gateway.limits.redis_store import RedisStore
from gateway.metrics import Metrics
from gateway.proxy.quota import RETRY_DOWN, KeyLimiter
from gateway.testing import FakeCloud

ALICE_KEY = "sk-alice-limits-7c1e9b20d4"
BOB_KEY = "sk-bob-limits-3f8a6d41e2c5"
CAROL_KEY = "sk-carol-limits-90ab13cd7e"
EVENTS = 5
TOKENS = 1 + EVENTS  # prompt "Hi" + one completion token per event
WAIT = 5.0  # bound on something that must happen soon
POLL = 0.02  # polling interval where no event can be awaited (a retry timer in the gateway)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def team(
    alice: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
    **defaults: Any,
) -> Callable[[dict[str, Any]], None]:
    """Config edit: keys alice (with ``alice``'s limits), bob and carol; ``key_defaults``."""

    def edit(config: dict[str, Any]) -> None:
        config["listen"]["api_keys"] = [
            {"name": "alice", "key": ALICE_KEY, **(alice or {})},
            {"name": "bob", "key": BOB_KEY},
            {"name": "carol", "key": CAROL_KEY},
        ]
        if defaults:
            config["listen"]["key_defaults"] = defaults
        if store is not None:
            config["limits_store"] = store

    return edit


async def post(
    http: aiohttp.ClientSession, url: str, key: str, stream: bool = False, **extra: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(
        url + "/v1/chat/completions", json=chat_body(stream=stream, **extra), headers=bearer(key)
    ) as resp:
        data: Any = await resp.json() if resp.content_type == "application/json" else None
        await resp.read()
        return resp.status, data, resp


def assert_refusal(data: Any, code: str, type_: str) -> None:
    assert set(data) == {"error"}, data
    error = data["error"]
    assert error["code"] == code, error
    assert error["type"] == type_, error
    assert isinstance(error["message"], str) and "alice" in error["message"]


def retry_after(resp: aiohttp.ClientResponse) -> int:
    value = resp.headers["Retry-After"]
    assert value.isdigit(), value
    return int(value)


def seconds_to_utc_midnight() -> float:
    now = time.time()
    today = time.gmtime(now)
    midnight = calendar.timegm((today.tm_year, today.tm_mon, today.tm_mday, 0, 0, 0)) + 86400
    return midnight - now


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Await a condition another task will make true (bounded polling, no fixed wait)."""
    for _ in range(int(WAIT / POLL)):
        if predicate():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await RedisServer().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """``limits_store`` as parsed YAML: memory, or a fresh redis-server of its own."""
    if request.param == "memory":
        yield {"type": "memory"}
        return
    server = await RedisServer().start()
    try:
        yield {"type": "redis", "url": server.url}
    finally:
        await server.stop()


@pytest.fixture
def script(cloud: FakeCloud) -> None:
    cloud.modelarts.script.events = EVENTS


# --- each limit refuses at exactly its threshold, in each store -----------------------------------


async def test_requests_per_minute_refuses_the_request_after_the_limit_with_retry_after(
    make_gateway: GatewayFactory,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
) -> None:
    gw = await make_gateway(team({"requests_per_minute": 3}, store))
    for _ in range(3):
        status, _, _ = await post(http, gw.url, ALICE_KEY)
        assert status == 200
    status, data, resp = await post(http, gw.url, ALICE_KEY)
    assert status == 429
    assert_refusal(data, "rate_limit_exceeded", "requests")
    assert 58 <= retry_after(resp) <= 60, "the first of the three is under a second old"
    assert len(cloud.modelarts.requests) == 3, "a refused request never goes upstream"
    status, _, _ = await post(http, gw.url, BOB_KEY)
    assert status == 200, "another key has its own count"
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="requests_per_minute") == 1
    assert gw.metric("gateway_key_requests_total", key="alice", status="429") == 1


async def test_a_burst_of_concurrent_requests_admits_exactly_the_limit(
    make_gateway: GatewayFactory,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
) -> None:
    gw = await make_gateway(team({"requests_per_minute": 7}, store))
    results = await asyncio.gather(*(post(http, gw.url, ALICE_KEY) for _ in range(25)))
    assert sorted(status for status, _, _ in results) == [200] * 7 + [429] * 18
    assert len(cloud.modelarts.requests) == 7
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="requests_per_minute") == 18


@pytest.mark.parametrize(("limit", "admitted"), [(2 * TOKENS, 2), (2 * TOKENS + 1, 3)])
@pytest.mark.usefixtures("script")
async def test_tokens_per_minute_admits_while_below_the_limit_then_refuses(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
    limit: int,
    admitted: int,
) -> None:
    gw = await make_gateway(team({"tokens_per_minute": limit}, store))
    for _ in range(admitted):
        status, _, _ = await post(http, gw.url, ALICE_KEY)
        assert status == 200
    status, data, resp = await post(http, gw.url, ALICE_KEY)
    assert status == 429, f"{admitted * TOKENS} tokens used of {limit}"
    assert_refusal(data, "rate_limit_exceeded", "tokens")
    assert 58 <= retry_after(resp) <= 60
    status, _, _ = await post(http, gw.url, BOB_KEY)
    assert status == 200
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="tokens_per_minute") == 1


@pytest.mark.parametrize("asked", [True, False], ids=["client_asks_usage", "route_asks_usage"])
@pytest.mark.usefixtures("script")
async def test_a_streams_usage_event_counts_against_tokens_per_minute(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
    asked: bool,
) -> None:
    def edit(config: dict[str, Any]) -> None:
        team({"tokens_per_minute": 2 * TOKENS}, store)(config)
        config["routes"][0]["include_usage"] = not asked

    gw = await make_gateway(edit)
    extra = {"stream_options": {"include_usage": True}} if asked else {}
    for _ in range(2):
        status, _, _ = await post(http, gw.url, ALICE_KEY, stream=True, **extra)
        assert status == 200
    status, data, resp = await post(http, gw.url, ALICE_KEY, stream=True, **extra)
    assert status == 429, "two streams of 6 tokens each used the 12"
    assert_refusal(data, "rate_limit_exceeded", "tokens")
    assert 58 <= retry_after(resp) <= 60


@pytest.mark.parametrize(("limit", "admitted"), [(2 * TOKENS, 2), (2 * TOKENS + 1, 3)])
@pytest.mark.usefixtures("script")
async def test_tokens_per_day_refuses_with_insufficient_quota_until_utc_midnight(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
    limit: int,
    admitted: int,
) -> None:
    gw = await make_gateway(team({"tokens_per_day": limit}, store))
    for _ in range(admitted):
        status, _, _ = await post(http, gw.url, ALICE_KEY)
        assert status == 200
    status, data, resp = await post(http, gw.url, ALICE_KEY)
    expected = seconds_to_utc_midnight()
    assert status == 429
    assert_refusal(data, "insufficient_quota", "insufficient_quota")
    assert expected - 2 <= retry_after(resp) <= expected + 2
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="tokens_per_day") == 1


async def test_key_max_concurrency_refuses_with_rate_limit_exceeded_and_counts_it(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(team({"max_concurrency": 2}))
    cloud.modelarts.script.header_delay = 2.0
    held = [asyncio.create_task(post(http, gw.url, ALICE_KEY)) for _ in range(2)]
    try:
        await until(lambda: len(cloud.modelarts.requests) == 2, "both went upstream")
        cloud.modelarts.script.header_delay = 0.0
        status, data, resp = await post(http, gw.url, ALICE_KEY)
        assert status == 429
        assert_refusal(data, "rate_limit_exceeded", "requests")
        assert retry_after(resp) == 1
    finally:
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
    assert gw.metric("gateway_rate_limited_total", key="alice", limit="max_concurrency") == 1
    status, _, _ = await post(http, gw.url, ALICE_KEY)
    assert status == 200, "the slots are back once the held requests ended"


async def test_key_defaults_apply_to_every_key_an_entry_overrides_and_0_lifts_them(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(
        lambda c: (
            team({"requests_per_minute": 2}, requests_per_minute=1)(c),
            c["listen"]["api_keys"][1].update(requests_per_minute=0),
        )
    )
    statuses = {}
    for name, key in (("alice", ALICE_KEY), ("bob", BOB_KEY), ("carol", CAROL_KEY)):
        statuses[name] = [(await post(http, gw.url, key))[0] for _ in range(4)]
    assert statuses == {
        "alice": [200, 200, 429, 429],
        "bob": [200, 200, 200, 200],
        "carol": [200, 429, 429, 429],
    }
    alice, bob, carol = gw.settings.listen.api_keys
    assert alice.limits == KeyLimits(requests_per_minute=2)
    assert bob.limits == KeyLimits()
    assert carol.limits == KeyLimits(requests_per_minute=1)


@pytest.mark.usefixtures("script")
async def test_openai_sdk_sees_rate_limit_error_for_each_refusal(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        team({"requests_per_minute": 1, "tokens_per_day": 0}, tokens_per_day=TOKENS)
    )
    clients = {
        key: openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
        for key in (ALICE_KEY, BOB_KEY)
    }
    try:
        messages: Any = [{"role": "user", "content": "Hi"}]
        for key in (ALICE_KEY, BOB_KEY):
            await clients[key].chat.completions.create(model="qwen2-7b", messages=messages)
        with pytest.raises(openai.RateLimitError) as minute:
            await clients[ALICE_KEY].chat.completions.create(model="qwen2-7b", messages=messages)
        assert minute.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError) as day:
            await clients[BOB_KEY].chat.completions.create(model="qwen2-7b", messages=messages)
        assert day.value.code == "insufficient_quota"
    finally:
        for client in clients.values():
            await client.close()


async def test_refusal_comes_before_100_continue_so_the_body_is_never_sent(
    make_gateway: GatewayFactory, cloud: FakeCloud, store: dict[str, Any]
) -> None:
    gw = await make_gateway(team({"requests_per_minute": 1}, store))
    host = gw.url.removeprefix("http://")
    head = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}
    answers = []
    for _ in range(2):
        reader, writer = await open_raw(gw.url)
        try:
            body = b'{"model": "qwen2-7b", "messages": []}'
            # the head only: Content-Length announces the body the client holds back
            request = request_bytes(
                "POST", "/v1/chat/completions", host, headers={**head, "Expect": "100-continue"}
            ).replace(b"Content-Length: 0\r\n", b"Content-Length: %d\r\n" % len(body))
            writer.write(request)
            await writer.drain()
            answer = await read_answer(reader)
            assert answer is not None
            statuses = [answer.status]
            if answer.status == 100:
                writer.write(body)
                answer = await read_answer(reader)
                assert answer is not None
                statuses.append(answer.status)
            answers.append((statuses, answer))
        finally:
            writer.close()
    assert answers[0][0] == [100, 200]
    assert answers[1][0] == [429], "refused from the headers, without asking for the body"
    assert answers[1][1].headers["Retry-After"].isdigit()
    assert len(cloud.modelarts.requests) == 1


# --- the windows, on the memory store's clock ----------------------------------------------------


def test_requests_window_slides_exactly_and_retry_after_is_when_it_admits_again() -> None:
    store = MemoryStore()
    limits = KeyLimits(requests_per_minute=2)
    t0 = 1_700_000_000.25
    assert store.admit_now("k", limits, t0) is None
    assert store.admit_now("k", limits, t0 + 30) is None
    assert store.admit_now("k", limits, t0 + 40) == Refusal("requests_per_minute", 20)
    assert store.admit_now("k", limits, t0 + 59.5) == Refusal("requests_per_minute", 1)
    assert store.admit_now("k", limits, t0 + 60) is None, "the first is 60 s old: out"
    assert store.admit_now("k", limits, t0 + 61) == Refusal("requests_per_minute", 29)
    assert store.admit_now("other", limits, t0 + 61) is None


def test_tokens_window_admits_below_the_limit_and_retry_after_counts_the_buckets() -> None:
    store = MemoryStore()
    limits = KeyLimits(tokens_per_minute=100)
    t0 = 1_700_000_000.0
    assert store.admit_now("k", limits, t0) is None
    store.record_now("k", limits, 60, t0 + 0.5)
    assert store.admit_now("k", limits, t0 + 10) is None, "60 < 100"
    store.record_now("k", limits, 60, t0 + 10.5)
    # 120: admitted again when the first 60 leave the window (bucket t0, at t0 + 60)
    assert store.admit_now("k", limits, t0 + 20) == Refusal("tokens_per_minute", 40)
    assert store.admit_now("k", limits, t0 + 60) is None
    store.record_now("k", limits, 50, t0 + 61)
    assert store.admit_now("k", limits, t0 + 62) == Refusal("tokens_per_minute", 8)


def test_tokens_per_day_renews_at_utc_midnight() -> None:
    store = MemoryStore()
    limits = KeyLimits(tokens_per_day=10)
    midnight = calendar.timegm((2026, 12, 4, 0, 0, 0))
    store.record_now("k", limits, 10, midnight - 3600)
    assert store.admit_now("k", limits, midnight - 0.5) == Refusal("tokens_per_day", 1)
    assert store.admit_now("k", limits, midnight - 100.2) == Refusal("tokens_per_day", 101)
    assert store.admit_now("k", limits, midnight) is None


# --- one limit across replicas: two gateway processes on one Redis --------------------------------


async def spawn_gateway(
    config: dict[str, Any], tmp_path: Path, n: int
) -> tuple[asyncio.subprocess.Process, str, Path]:
    port = free_port()
    config = copy.deepcopy(config)
    config["listen"]["port"] = port
    path = tmp_path / f"gateway{n}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = tmp_path / f"gateway{n}.log"
    with log_path.open("wb") as log_file:
        proc = await start_gateway_process(
            "--config", str(path), env=dict(os.environ), stderr=log_file
        )
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url, proc, log=lambda: log_path.read_text(encoding="utf-8"))
    return proc, url, log_path


async def test_two_gateway_processes_on_one_redis_admit_exactly_the_limit(
    cloud: FakeCloud,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    config = base_config(cloud)
    team({"requests_per_minute": 10}, {"type": "redis", "url": redis_server.url})(config)
    procs = []
    try:
        urls = []
        for n in range(2):
            proc, url, _ = await spawn_gateway(config, tmp_path, n)
            procs.append(proc)
            urls.append(url)
        # twenty at once, ten to each process: only Redis can make the count come out exact
        results = await asyncio.gather(*(post(http, urls[i % 2], ALICE_KEY) for i in range(20)))
        statuses = [status for status, _, _ in results]
        assert sorted(statuses) == [200] * 10 + [429] * 10
        assert len(cloud.modelarts.requests) == 10
        for status, data, resp in results:
            if status == 429:
                assert_refusal(data, "rate_limit_exceeded", "requests")
                assert 58 <= retry_after(resp) <= 60
        # both processes refused some: the limit is the pair's, not each one's
        per_process = [[s for i, (s, _, _) in enumerate(results) if i % 2 == p] for p in (0, 1)]
        assert all(200 in s or 429 in s for s in per_process)
        status, _, _ = await post(http, urls[0], BOB_KEY)
        assert status == 200
    finally:
        for proc in procs:
            await stop_process(proc)


async def test_a_reload_of_one_replica_changes_its_limit_and_the_shared_count_stays(
    cloud: FakeCloud,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    config = base_config(cloud)
    team({"requests_per_minute": 4}, {"type": "redis", "url": redis_server.url})(config)
    procs = []
    try:
        urls, logs = [], []
        for n in range(2):
            proc, url, log_path = await spawn_gateway(config, tmp_path, n)
            procs.append(proc)
            urls.append(url)
            logs.append(log_path)
        assert [(await post(http, urls[i % 2], ALICE_KEY))[0] for i in range(4)] == [200] * 4
        assert (await post(http, urls[1], ALICE_KEY))[0] == 429
        # replica 1 reloads with a higher limit: the four already made still count there
        path = tmp_path / "gateway1.yaml"
        raised = yaml.safe_load(path.read_text(encoding="utf-8"))
        raised["listen"]["api_keys"][0]["requests_per_minute"] = 6
        path.write_text(yaml.safe_dump(raised), encoding="utf-8")
        procs[1].send_signal(signal.SIGHUP)
        await until(
            lambda: "config reloaded (SIGHUP)" in logs[1].read_text(encoding="utf-8"),
            "replica 1 reloaded",
        )
        assert [(await post(http, urls[1], ALICE_KEY))[0] for _ in range(3)] == [200, 200, 429]
        # replica 0 keeps its limit of 4 against the six now counted, and says when it admits
        status, data, resp = await post(http, urls[0], ALICE_KEY)
        assert status == 429
        assert_refusal(data, "rate_limit_exceeded", "requests")
        assert 57 <= retry_after(resp) <= 60
        assert len(cloud.modelarts.requests) == 6
    finally:
        for proc in procs:
            await stop_process(proc)


# --- how often Redis is called: counted by the server itself (MONITOR) --------------------------

# A MONITOR line: +<time> [<db> <client address, or "lua" inside a script>] "<COMMAND>" "<arg>"...
MONITOR_LINE = re.compile(rb'^\+[0-9.]+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


class RedisCommands:
    """The commands clients send to a redis-server, as its MONITOR feed shows them in the order
    it runs them (a script's own ``redis.call`` commands left out: they are not round trips).

    ``since_last`` sends a marker (``ECHO``) on a connection of its own and returns what ran
    before it: everything a finished exchange sent, without waiting for a quiet moment.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self._marks = itertools.count(1)

    async def start(self) -> RedisCommands:
        self._feed = await asyncio.open_connection("127.0.0.1", self.server.port)
        self._marker = await asyncio.open_connection("127.0.0.1", self.server.port)
        host, port = self._marker[1].get_extra_info("sockname")[:2]
        self._marker_address = f"{host}:{port}".encode()
        self._feed[1].write(b"MONITOR\r\n")
        assert await self._feed[0].readline() == b"+OK\r\n"
        return self

    async def close(self) -> None:
        for _, writer in (self._feed, self._marker):
            writer.close()

    async def _next(self) -> tuple[bytes, bytes, bytes]:
        """(client address, command, first argument) of the next line of the feed."""
        line = await asyncio.wait_for(self._feed[0].readline(), WAIT)
        match = MONITOR_LINE.match(line)
        assert match is not None, line
        address, command, first = match.groups()
        return address, command.upper(), first or b""

    async def wait_for(self, count: int) -> list[str]:
        """The next ``count`` commands a client other than the marker sends (bounded wait)."""
        seen: list[str] = []
        while len(seen) < count:
            address, command, _ = await self._next()
            if address not in (b"lua", self._marker_address):
                seen.append(command.decode())
        return seen

    async def since_last(self) -> list[str]:
        """Every command clients sent since the previous call (or ``start``)."""
        mark = f"mark-{next(self._marks)}".encode()
        self._marker[1].write(b"*2\r\n$4\r\nECHO\r\n$%d\r\n%b\r\n" % (len(mark), mark))
        assert await asyncio.wait_for(self._marker[0].readline(), WAIT) == b"$%d\r\n" % len(mark)
        await self._marker[0].readline()
        seen: list[str] = []
        while True:
            address, command, first = await self._next()
            if address == self._marker_address and (command, first) == (b"ECHO", mark):
                return seen
            if address != b"lua":
                seen.append(command.decode())


@pytest.fixture
async def redis_commands(redis_server: RedisServer) -> AsyncIterator[RedisCommands]:
    commands = await RedisCommands(redis_server).start()
    try:
        yield commands
    finally:
        await commands.close()


@pytest.mark.parametrize(
    ("limits", "calls"),
    [
        ({"requests_per_minute": 100}, ["EVALSHA"]),
        ({"tokens_per_minute": 10**6}, ["EVALSHA", "EVALSHA"]),
        ({"tokens_per_day": 10**6}, ["EVALSHA", "EVALSHA"]),
        ({"requests_per_minute": 100, "tokens_per_minute": 10**6}, ["EVALSHA", "EVALSHA"]),
    ],
    ids=["requests", "tokens_per_minute", "tokens_per_day", "both"],
)
@pytest.mark.usefixtures("script")
async def test_redis_is_called_once_before_a_request_and_once_after_for_token_limits(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    redis_commands: RedisCommands,
    http: aiohttp.ClientSession,
    limits: dict[str, int],
    calls: list[str],
) -> None:
    store = {"type": "redis", "url": redis_server.url}
    edit = team(limits, store)

    def with_carol_concurrency(config: dict[str, Any]) -> None:
        edit(config)
        config["listen"]["api_keys"][2]["max_concurrency"] = 2  # a limit Redis does not count

    gw = await make_gateway(with_carol_concurrency)
    assert (await post(http, gw.url, ALICE_KEY))[0] == 200  # connects, loads the scripts
    await redis_commands.since_last()
    for _ in range(3):
        assert (await post(http, gw.url, ALICE_KEY))[0] == 200
        assert await redis_commands.since_last() == calls, "one round trip each: admit, record"
    for key in (BOB_KEY, CAROL_KEY):
        assert (await post(http, gw.url, key))[0] == 200
        assert await redis_commands.since_last() == [], "a key without counted limits: none"


async def test_redis_is_never_called_while_a_stream_is_relayed(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    redis_commands: RedisCommands,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
) -> None:
    limits = {"requests_per_minute": 100, "tokens_per_minute": 10**6}
    gw = await make_gateway(team(limits, {"type": "redis", "url": redis_server.url}))
    assert (await post(http, gw.url, ALICE_KEY))[0] == 200  # connects, loads the scripts
    await redis_commands.since_last()
    cloud.modelarts.script.events = 50  # a second of events: the checks below fit in it
    cloud.modelarts.script.interval = 0.02
    body = chat_body(stream=True, stream_options={"include_usage": True})
    received = b""
    async with http.post(
        gw.url + "/v1/chat/completions", json=body, headers=bearer(ALICE_KEY)
    ) as resp:
        assert resp.status == 200
        received += await resp.content.readany()
        assert await redis_commands.since_last() == ["EVALSHA"], "the admission, before it"
        for _ in range(5):  # events keep coming: Redis hears nothing of them
            received += await resp.content.readany()
            assert b"[DONE]" not in received, "still relaying"
            assert await redis_commands.since_last() == []
        received += await resp.content.read()
    assert received.endswith(b"data: [DONE]\n\n")
    # the tokens are recorded once the relay is over (after the client has its last byte)
    assert await redis_commands.wait_for(1) == ["EVALSHA"]
    assert await redis_commands.since_last() == []


# --- Redis going away mid-run ---------------------------------------------------------------------


async def until_recovered(
    http: aiohttp.ClientSession, gw: RunningGateway, logs: pytest.LogCaptureFixture
) -> int:
    """Send requests until the gateway says the store answers again; the last one's status."""
    async with asyncio.timeout(WAIT):
        while True:
            status, _, _ = await post(http, gw.url, ALICE_KEY)
            if any("answers again" in r.getMessage() for r in logs.records):
                return status
            await asyncio.sleep(POLL)


def store_warnings(logs: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in logs.records if "limits store failed" in r.getMessage()]


async def test_redis_on_a_unix_socket_counts_too(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    with tempfile.TemporaryDirectory(prefix="mag-") as directory:  # short: sun_path is 108 bytes
        server = await RedisServer(unix_socket=f"{directory}/redis.sock").start()
        try:
            store = {"type": "redis", "url": server.url}
            gw = await make_gateway(team({"requests_per_minute": 2}, store))
            statuses = [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(3)]
            assert statuses == [200, 200, 429]
            assert gw.metric("gateway_limits_store_errors_total", operation="admit") == 0
        finally:
            await server.stop()


async def test_redis_down_with_on_error_allow_admits_unchecked_then_enforces_again(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    store = {"type": "redis", "url": redis_server.url, "on_error": "allow"}
    gw = await make_gateway(team({"requests_per_minute": 2}, store))
    assert [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(3)] == [200, 200, 429]

    await redis_server.stop()
    assert [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(5)] == [200] * 5
    assert gw.metric("gateway_limits_store_errors_total", operation="admit") >= 1
    warnings = store_warnings(captured_logs)
    assert len(warnings) == 1, "warned once, not once per request"
    assert warnings[0].levelno == logging.WARNING
    assert "admitted unchecked" in warnings[0].getMessage()

    await redis_server.start()  # same port, empty: counting starts again
    assert await until_recovered(http, gw, captured_logs) == 200  # counted: 1 of 2
    assert [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(2)] == [200, 429]


async def test_redis_down_with_on_error_deny_answers_503_then_serves_again(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    store = {"type": "redis", "url": redis_server.url, "on_error": "deny"}
    gw = await make_gateway(team({"requests_per_minute": 2}, store))
    assert [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(3)] == [200, 200, 429]

    await redis_server.stop()
    for _ in range(3):
        status, data, _ = await post(http, gw.url, ALICE_KEY)
        assert status == 503
        assert data["error"]["code"] == "limits_unavailable"
        assert "127.0.0.1" not in data["error"]["message"]
    assert len(cloud.modelarts.requests) == 2
    status, _, _ = await post(http, gw.url, BOB_KEY)
    assert status == 200, "a key without counted limits needs no store"
    assert gw.metric("gateway_limits_store_errors_total", operation="admit") >= 1
    assert gw.metric("gateway_rejected_total", route="chat", reason="limits_unavailable") == 3
    assert "refused unchecked" in store_warnings(captured_logs)[0].getMessage()

    await redis_server.start()
    assert await until_recovered(http, gw, captured_logs) == 200
    assert [(await post(http, gw.url, ALICE_KEY))[0] for _ in range(2)] == [200, 429]


async def test_a_running_stream_never_waits_on_redis_and_finishes_when_it_dies(
    make_gateway: GatewayFactory,
    redis_server: RedisServer,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
) -> None:
    store = {"type": "redis", "url": redis_server.url, "on_error": "deny"}
    gw = await make_gateway(team({"requests_per_minute": 5, "tokens_per_day": 10**6}, store))
    cloud.modelarts.script.events = 20
    cloud.modelarts.script.interval = 0.02
    async with http.post(
        gw.url + "/v1/chat/completions", json=chat_body(stream=True), headers=bearer(ALICE_KEY)
    ) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        await redis_server.stop()  # mid-stream: nothing on the relay path asks Redis
        body = first + await resp.content.read()
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 1 + 20 + 1, "role, every content event, finish"
    assert body.endswith(b"data: [DONE]\n\n")
    status, data, _ = await post(http, gw.url, ALICE_KEY)
    assert (status, data["error"]["code"]) == (503, "limits_unavailable")


async def test_the_redis_password_is_never_logged_when_redis_fails(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    password = "redis-pass-5e1d0c9b7a"
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = await make_gateway(team({"requests_per_minute": 2}, {"type": "redis", "url": url}))
    assert (await post(http, gw.url, ALICE_KEY))[0] == 200
    assert store_warnings(captured_logs), "the failure was logged"
    assert password not in captured_logs.text
    async with http.get(gw.url + "/metrics") as resp:
        assert password not in await resp.text()


async def test_redis_that_accepts_but_never_answers_delays_no_request_beyond_its_timeout(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the commands, answers nothing, until the client hangs up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = {"type": "redis", "url": f"redis://127.0.0.1:{port}/0", "timeout": "200ms"}
        gw = await make_gateway(team({"requests_per_minute": 2}, store))
        took = []
        for _ in range(6):
            start = time.monotonic()
            status, _, _ = await post(http, gw.url, ALICE_KEY)
            took.append(time.monotonic() - start)
            assert status == 200
        # the first pays the timeout (and one retry on a fresh connection); the rest go on at
        # once while the gateway waits a second before trying the store again
        assert took[0] < 2.0, took
        assert max(took[1:]) < 0.15, took
        assert gw.metric("gateway_limits_store_errors_total", operation="admit") == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_after_a_failure_one_record_probes_a_silent_redis_the_others_do_not_wait() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = LimitsStore(type="redis", url=Secret(f"redis://127.0.0.1:{port}/0"), timeout=0.1)
    metrics = Metrics()
    limiter = KeyLimiter(RedisStore(config), config, metrics)
    key = ApiKey("alice", b"\0" * 32, limits=KeyLimits(tokens_per_minute=100))
    try:
        await limiter.admit(key, None)  # times out: the store is down, allow lets it go
        await asyncio.sleep(RETRY_DOWN)  # the gateway's own retry timer: no event to await
        # five requests end at once, past the retry second: one tries Redis, four go on
        start = time.monotonic()
        finished: list[float] = []

        async def ends() -> None:
            await limiter.record_tokens(key, 5)
            finished.append(time.monotonic() - start)

        await asyncio.gather(*(ends() for _ in range(5)))
        failed = metrics.registry.get_sample_value(
            "gateway_limits_store_errors_total", {"operation": "record"}
        )
        assert failed == 1, "only the probe waited on the silent store"
        assert sorted(finished)[3] < 0.1, finished
    finally:
        await limiter.store.close()
        server.close()
        await server.wait_closed()


# --- config ---------------------------------------------------------------------------------------


def problems_of(edit: Callable[[dict[str, Any]], None]) -> list[str]:
    config = {
        "listen": {"api_keys": [{"name": "alice", "key": ALICE_KEY}]},
        "credentials": {"tok": {"type": "token", "token": "t"}},
        "routes": [{"name": "chat", "upstream": "https://example.com/v1", "credential": "tok"}],
    }
    edit(config)
    with pytest.raises(ConfigError) as info:
        parse_settings(config, {})
    return info.value.problems


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["listen"]["api_keys"][0].update(requests_per_minute="ten"),
            "listen.api_keys[0].requests_per_minute: must be a whole number",
        ),
        (
            lambda c: c["listen"]["api_keys"][0].update(tokens_per_day=-1),
            "listen.api_keys[0].tokens_per_day: must be >= 0",
        ),
        (
            lambda c: c["listen"].update(key_defaults={"tokens_per_minute": 1.5}),
            "listen.key_defaults.tokens_per_minute: must be a whole number",
        ),
        (
            lambda c: c["listen"].update(key_defaults={"requests_per_hour": 5}),
            "listen.key_defaults.requests_per_hour: unknown key",
        ),
        (
            lambda c: c["listen"].update(key_defaults=[1]),
            "listen.key_defaults: must be a mapping",
        ),
        (lambda c: c.update(limits_store={"type": "etcd"}), "limits_store.type: unknown type"),
        (lambda c: c.update(limits_store={"type": "redis"}), "limits_store.url: is required"),
        (
            lambda c: c.update(limits_store={"type": "redis", "url": "http://r:6379"}),
            "limits_store.url: must be a redis://",
        ),
        (
            lambda c: c.update(limits_store={"type": "redis", "url": "redis:///0"}),
            "limits_store.url: must name a host",
        ),
        (
            lambda c: c.update(limits_store={"url": "redis://r:6379/0"}),
            "limits_store.url: applies only to type: redis",
        ),
        (
            lambda c: c.update(limits_store={"on_error": "ignore"}),
            "limits_store.on_error: must be one of: allow, deny",
        ),
        (lambda c: c.update(limits_store={"timeout": 0}), "limits_store.timeout: must be > 0"),
        (lambda c: c.update(limits_store={"prefix": "x"}), "limits_store.prefix: unknown key"),
    ],
)
def test_bad_limits_config_names_the_dotted_key(
    edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    problems = problems_of(edit)
    assert any(p.startswith(expected) for p in problems), problems


def test_redis_url_password_is_never_in_a_problem_or_the_settings_repr() -> None:
    url = "http://:hunter2-redis-pass@r:6379/0"
    problems = problems_of(lambda c: c.update(limits_store={"type": "redis", "url": url}))
    assert problems and not any("hunter2" in p for p in problems)
    good = {
        "listen": {"api_keys": [{"name": "alice", "key": ALICE_KEY, "tokens_per_day": 5}]},
        "credentials": {"tok": {"type": "token", "token": "t"}},
        "routes": [{"name": "chat", "upstream": "https://example.com/v1", "credential": "tok"}],
        "limits_store": {
            "type": "redis",
            "url": "redis://:hunter2-redis-pass@r:6379/0",
            "key_prefix": "team-a:",
            "on_error": "deny",
            "timeout": "100ms",
        },
    }
    settings = parse_settings(good, {})
    assert "hunter2" not in repr(settings)
    store = settings.limits_store
    assert (store.type, store.key_prefix, store.on_error, store.timeout) == (
        "redis",
        "team-a:",
        "deny",
        0.1,
    )
    assert settings.listen.api_keys[0].limits == KeyLimits(tokens_per_day=5)


def test_memory_is_the_default_store_and_no_limit_is_the_default() -> None:
    settings = parse_settings(
        {
            "credentials": {"tok": {"type": "token", "token": "t"}},
            "routes": [{"name": "chat", "upstream": "https://example.com/v1", "credential": "tok"}],
        },
        {},
    )
    assert settings.limits_store.type == "memory"
    assert settings.limits_store.on_error == "allow"
    assert settings.listen.key_defaults == KeyLimits()
