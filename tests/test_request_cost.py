"""What the per-request shortcuts (issue 13) remember, and that they change no answer.

``Targets`` remembers checked targets, ``UpstreamBase.url`` the URLs built from them: both only
for targets without a query (a query may carry a client's key), both bounded, and an invalid
target is refused every time, never remembered. ``gc_tuning.settle`` collects less often but
still collects.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from yarl import URL

from gateway.deadlines import Deadlines
from gateway.errors import BadRequest
from gateway.proxy import target as target_module
from gateway.proxy.target import REMEMBERED, Targets, UpstreamBase, parse_target
from gateway.server import gc_tuning


def test_a_remembered_target_is_the_parsed_one_and_invalid_ones_are_refused_each_time() -> None:
    targets = Targets()
    first = targets("/v1/chat/completions")
    assert first == parse_target("/v1/chat/completions")
    assert targets("/v1/chat/completions") is first
    for _ in range(2):
        with pytest.raises(BadRequest):
            targets("/v1/../admin")
        with pytest.raises(BadRequest):
            targets("/v1/%2e%2e/admin")


def test_targets_with_a_query_are_parsed_every_time_and_never_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    targets = Targets()
    calls: list[str] = []
    real = target_module.parse_target

    def counting(raw: str) -> target_module.Target:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(target_module, "parse_target", counting)
    raw = "/v1/chat/completions?api_key=sk-client-secret-0123456789"
    assert targets(raw).query == "api_key=sk-client-secret-0123456789"
    assert targets(raw).query
    assert calls == [raw, raw]
    assert all("sk-client" not in key for key in targets._seen)


def test_the_memo_is_bounded() -> None:
    targets = Targets()
    for i in range(REMEMBERED * 3):
        targets(f"/v1/p{i}")
    assert len(targets._seen) <= REMEMBERED
    base = UpstreamBase(URL("https://svc.example.com/v1/infers/abc"))
    for i in range(REMEMBERED * 3):
        base.url(parse_target(f"/v1/p{i}"))
    assert len(base._urls) <= REMEMBERED


def test_a_remembered_url_is_the_one_built_and_a_query_url_is_built_each_time() -> None:
    base = UpstreamBase(URL("https://svc.example.com:8443/v1/infers/abc/"))
    plain = parse_target("/v1/chat/completions")
    url = base.url(plain)
    assert str(url) == "https://svc.example.com:8443/v1/infers/abc/v1/chat/completions"
    assert base.url(plain) is url
    query = parse_target("/v1/models?limit=5")
    assert str(base.url(query)) == "https://svc.example.com:8443/v1/infers/abc/v1/models?limit=5"
    assert "/v1/models" not in base._urls


# --- Deadlines: futures failed at their deadlines, many on one timer ----------------------


async def test_a_future_not_done_by_its_deadline_fails_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    waiter = loop.create_future()
    start = loop.time()
    deadlines.add(waiter, start + 0.05)
    with pytest.raises(TimeoutError):
        await waiter
    assert 0.045 <= loop.time() - start < 0.5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_future_done_in_time_is_left_alone_and_dropped() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    waiter = loop.create_future()
    deadlines.add(waiter, loop.time() + 0.01)
    waiter.set_result("headers")
    await asyncio.sleep(0.05)  # past the deadline: the timer fired and touched nothing
    assert waiter.result() == "headers"
    assert len(deadlines) == 0


async def test_many_futures_on_one_timer_each_fail_at_their_own_deadline() -> None:
    """Deadlines added in an order that is not theirs, with futures done early among them: each
    late one fails at its deadline (not before, not at another's), each early one is kept."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    outcomes: dict[str, tuple[str, float]] = {}

    async def wait(name: str, delay: float, done_after: float | None) -> None:
        start = loop.time()
        waiter: asyncio.Future[str] = loop.create_future()
        deadlines.add(waiter, start + delay)
        if done_after is not None:
            loop.call_later(done_after, waiter.set_result, "ok")
        try:
            outcomes[name] = (await waiter, loop.time() - start)
        except TimeoutError:
            outcomes[name] = ("timeout", loop.time() - start)

    plan = {
        "late-0.30": (0.30, None),
        "early-0.05-of-0.10": (0.10, 0.05),
        "late-0.10": (0.10, None),
        "late-0.20": (0.20, None),
        "early-0.01-of-5": (5.0, 0.01),
        "late-0.15": (0.15, None),
    }
    await asyncio.gather(*(wait(n, d, f) for n, (d, f) in plan.items()))
    for name, (delay, done_after) in plan.items():
        result, took = outcomes[name]
        if done_after is None:
            assert result == "timeout", name
            assert delay - 0.005 <= took < delay + 0.25, (name, took)
        else:
            assert result == "ok", name


async def test_futures_done_behind_a_waiting_one_do_not_pile_up() -> None:
    """One future still waiting at the heap's top (the earliest deadline) and thousands of later
    ones done in time: the done ones are dropped (the heap is rebuilt) instead of staying until
    the waiting one ends."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    stuck = loop.create_future()
    deadlines.add(stuck, loop.time() + 10)
    for _ in range(5000):
        waiter = loop.create_future()
        deadlines.add(waiter, loop.time() + 30)
        waiter.set_result(None)
    assert len(deadlines) <= 600
    stuck.cancel()


async def test_a_deadline_added_after_an_earlier_one_was_met_still_fires() -> None:
    """The timer is armed for the earliest deadline; when that future is done early the timer
    stays, and on firing must re-arm for the next waiting one instead of forgetting it."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    early = loop.create_future()
    deadlines.add(early, loop.time() + 0.02)
    early.set_result(None)
    late = loop.create_future()
    start = loop.time()
    deadlines.add(late, start + 0.1)
    with pytest.raises(TimeoutError):
        await late
    assert 0.095 <= loop.time() - start < 0.5


async def test_an_earlier_deadline_added_later_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    late = loop.create_future()
    deadlines.add(late, loop.time() + 30)
    soon = loop.create_future()
    start = loop.time()
    deadlines.add(soon, start + 0.05)
    with pytest.raises(TimeoutError):
        await soon
    assert loop.time() - start < 0.5
    assert not late.done()
    late.cancel()


def test_after_settle_startup_objects_are_frozen_and_cyclic_garbage_is_still_collected() -> None:
    before = gc.get_threshold()
    try:
        gc_tuning.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, *before[1:])
        collected: list[bool] = []

        class Node:
            def __init__(self) -> None:
                self.me = self  # a cycle: only the collector frees it

        node = Node()
        weakref.finalize(node, collected.append, True)
        del node
        # enough new container objects to pass the young threshold: no explicit collect()
        keep: list[list[int]] = [[] for _ in range(gc_tuning.YOUNG_THRESHOLD * 2)]
        assert collected == [True]
        del keep
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- Guard: each Host value's verdict remembered, bounded, never mixed up -----------------


def test_remembered_host_verdicts_are_per_value_and_bounded() -> None:
    from aiohttp.test_utils import make_mocked_request

    from gateway.config.model import Listen
    from gateway.errors import Forbidden
    from gateway.proxy.guard import Guard

    guard = Guard(Listen(allowed_hosts=("gw.example",)))

    def check(host: str) -> bool:
        try:
            guard.check(make_mocked_request("POST", "/v1/x", headers={"Host": host}))
        except Forbidden:
            return False
        return True

    for _ in range(2):  # the second round answers from the memo: the same verdicts
        assert check("gw.example:8080") and check("127.0.0.1:8080") and check("[::1]:80")
        assert not check("evil.example") and not check("gw.example.evil.example")
        assert check("localhost") and not check("127.0.0.1.evil.example")
    for i in range(3000):  # a client sending a new Host every time cannot grow the memo
        assert not check(f"h{i}.evil.example")
    assert len(guard._hosts_seen) <= 1024
    assert check("gw.example") and not check("evil.example")
