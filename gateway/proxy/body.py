"""The body's ``model``, read the way any upstream would read it, without stalling streams.

Parsers disagree on a JSON object with a repeated key (Python takes the last, others the first)
and on key case (Go's ``encoding/json`` matches ``MODEL`` to ``model``). A body the gateway
routes or allowlists by ``model`` must mean one thing to every parser, so a repeated top-level
key, or one equal to ``model`` ignoring case but not spelled ``model``, is refused (400
ambiguous_model). Bad JSON, also JSON nested too deep for the parser, is a 400 invalid_json.

Parsing a body of megabytes takes the CPU for hundreds of milliseconds; on the event loop that
would stall every other client's stream, and in a thread it still would (the parser holds the
GIL). Bodies over ``OFF_LOOP`` bytes are parsed in a worker process, started on first need.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gateway.errors import BadRequest

OFF_LOOP = 64 * 1024  # bodies above this are parsed in the worker process
WORKERS = 2

Outcome = tuple[str | None, str | None, str | None]  # (model, error code, error message)

_pool: ProcessPoolExecutor | None = None


def parse_model(body: bytes) -> Outcome:
    """The body's ``model`` as (model, None, None), or (None, code, message) for a 400.

    Plain values only, so the worker process can hand it back.
    """
    if not body.strip():
        return None, None, None
    top: list[list[tuple[str, Any]]] = [[]]

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top[0] = pairs  # objects close innermost first: the last one seen is the top level
        return dict(pairs)

    try:
        data = json.loads(body, object_pairs_hook=pairs_hook)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "invalid_json", "the request body is not valid JSON"
    if not isinstance(data, dict):
        return None, "invalid_json", "the request body must be a JSON object"
    keys = [k for k, _ in top[0]]
    if len(keys) != len(data):
        return None, "ambiguous_model", "the request body repeats a top-level key"
    if any(k != "model" and k.lower() == "model" for k in keys):
        return (
            None,
            "ambiguous_model",
            'the request body has a key that differs from "model" only in case',
        )
    model = data.get("model")
    if model is None:
        return None, None, None
    if not isinstance(model, str):
        return None, "invalid_model", '"model" must be a string'
    return model, None, None


def _raise(outcome: Outcome) -> str | None:
    model, code, message = outcome
    if code is not None:
        raise BadRequest(message or "bad request body", code=code)
    return model


def model_of(body: bytes) -> str | None:
    """The body's ``model`` (None when absent), parsed here; raises BadRequest."""
    return _raise(parse_model(body))


async def sniff_model(body: bytes) -> str | None:
    """:func:`model_of`, in the worker process for a large body."""
    if len(body) <= OFF_LOOP:
        return model_of(body)
    loop = asyncio.get_running_loop()
    for _ in range(2):  # a worker killed under us: start a fresh pool once
        try:
            return _raise(await loop.run_in_executor(_executor(), parse_model, body))
        except BrokenProcessPool:
            shutdown()
    raise BadRequest("the request body could not be parsed", code="invalid_json")


def _executor() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # spawn: a fork of a process with a running event loop and threads is unsafe
        _pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def shutdown() -> None:
    """Stop the worker processes (at app cleanup); the next large body starts them again."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
