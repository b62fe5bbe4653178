"""Body edits as byte splices (issue 11, items 1 and 5): on many generated bodies, the walk
reads what ``json.loads`` reads, and an edit changes the value it targets and no other byte."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway.proxy.body import inspect, model_edit, parse_model, splice

ODD = ["café", "\u2028", "\\", '"', "emoji \U0001f600", "model", '"model": "x"', ""]


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(ODD) + str(rng.randrange(100))
    if kind == 1:
        return rng.choice([0, -1, 1.5, 1e300, 12345678901234567890])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.choice(ODD)
    if kind in (4, 5):
        return {f"k{i}": value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [value(rng, depth + 1) for _ in range(rng.randrange(4))]


def dumps(data: dict[str, Any], rng: random.Random) -> bytes:
    """JSON text with the spacing and escaping varied, as clients differ."""
    sep = rng.choice([(",", ":"), (", ", ": "), (" ,\n ", " :\t")])
    text = json.dumps(data, separators=sep, ensure_ascii=rng.random() < 0.5)
    return (rng.choice(["", " ", "\n\t"]) + text + rng.choice(["", "\n", "  "])).encode()


@pytest.mark.parametrize("seed", range(40))
def test_walk_agrees_with_json_loads_and_edits_touch_only_their_value(seed: int) -> None:
    rng = random.Random(seed)
    data: dict[str, Any] = {f"f{i}": value(rng) for i in range(rng.randrange(6))}
    keys = list(data)
    data["model"] = rng.choice(ODD) + "-m"
    data["stream"] = True
    if rng.random() < 0.5:
        data["stream_options"] = rng.choice([None, {}, {"x": 1}, {"include_usage": False}])
    order = rng.sample(
        [*keys, "model", "stream", *([] if "stream_options" not in data else ["stream_options"])],
        len(data),
    )
    body = dumps({k: data[k] for k in order}, rng)

    info = inspect(body)
    assert parse_model(body) == (data["model"], None, None)
    assert info.model == data["model"] and info.stream and not info.asks_usage
    assert info.ask_usage is not None

    # the model's span holds its value, and replacing it changes no byte outside the span
    assert info.model_span is not None
    start, end = info.model_span
    assert json.loads(body[start:end]) == data["model"]
    renamed = splice(body, [model_edit(info, "qwen2-7b")])
    prefix, suffix = common_ends(body, renamed)
    assert prefix >= start and len(body) - suffix <= end
    assert json.loads(renamed) == {**data, "model": "qwen2-7b"}
    # asking for usage adds or replaces at most that much, and both edits apply together
    asked = splice(body, [info.ask_usage])
    prefix, suffix = common_ends(body, asked)
    assert len(body) - prefix - suffix <= len(b"false")  # an insertion, or null/false replaced
    assert len(asked) - len(body) <= len(b',"stream_options":{"include_usage":true}')
    expected = {
        **data,
        "stream_options": {**(data.get("stream_options") or {}), "include_usage": True},
    }
    assert json.loads(asked) == expected
    both = splice(body, [model_edit(info, "qwen2-7b"), info.ask_usage])
    assert json.loads(both) == {**expected, "model": "qwen2-7b"}


def common_ends(a: bytes, b: bytes) -> tuple[int, int]:
    """Lengths of the longest common prefix and (not overlapping it) suffix of a and b."""
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a",}',
        b'{"model" "a"}',
        b'{"model":"a" "b":1}',
        b'{"model":}',
        b"{",
        b'{"a":1}}',
        b'{"model":"a"} {}',
        b"{'model':'a'}",
        b'{"a":[1,2}',
        b'\xff{"model":"a"}',
    ],
)
def test_malformed_bodies_are_invalid_json_as_json_loads_says(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body)
    assert parse_model(body)[1] == "invalid_json"
