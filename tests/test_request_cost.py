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
from typing import Any

import pytest
from yarl import URL

from gateway.errors import BadRequest
from gateway.proxy import target as target_module
from gateway.proxy.deadline import Deadline
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


# --- Deadline: asyncio.timeout's semantics with the loop given (no getpid() per request) ----


def deadline_of(kind: str, delay: float) -> Any:
    if kind == "asyncio.timeout":
        return asyncio.timeout(delay)
    return Deadline(asyncio.get_running_loop(), delay)


KINDS = ["asyncio.timeout", "Deadline"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_block_outlasting_its_deadline_raises_timeout_error(kind: str) -> None:
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        async with deadline_of(kind, 0.01):
            await never
    await asyncio.sleep(0)  # no cancellation left pending on the task


@pytest.mark.parametrize("kind", KINDS)
async def test_a_block_done_in_time_leaves_nothing_behind(kind: str) -> None:
    async with deadline_of(kind, 5):
        await asyncio.sleep(0)
    assert asyncio.current_task() is not None
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0.02)  # the timer was cancelled: nothing fires later


@pytest.mark.parametrize("kind", KINDS)
async def test_an_outside_cancellation_stays_a_cancellation(kind: str) -> None:
    started = asyncio.Event()

    async def client_call() -> None:
        async with deadline_of(kind, 5):
            started.set()
            await asyncio.get_running_loop().create_future()

    task = asyncio.create_task(client_call())
    await started.wait()
    task.cancel()  # the client went away: 499, not a 504
    with pytest.raises(asyncio.CancelledError):
        await task


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
