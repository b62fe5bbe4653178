"""Model aliases (issue 11, item 5): ``routes[].models`` entries ``{name, upstream}``. The body's
``model`` goes up as the upstream name and not one other byte changes; ``/v1/models``, key
allowlists and metric labels use the public name; bad entries stop start-up with dotted keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import (
    MODEL,
    GatewayFactory,
    RecordingUpstream,
    RunningGateway,
    chat_body,
    run_gateway_cli,
)

from gateway.config.load import ConfigError, parse_settings
from gateway.testing import FakeCloud

PUBLIC = "gpt-4o-mini"
ALICE_KEY = "sk-alice-alias-5e6f7a8b9c0d"
CAROL_KEY = "sk-carol-alias-1a2b3c4d5e6f"  # may use PUBLIC only
MODELS = [MODEL, {"name": PUBLIC, "upstream": MODEL}, {"name": "big", "upstream": "qwen2-72b"}]


def aliased(url: str | None = None, **route: Any) -> Callable[[dict[str, Any]], None]:
    """Config edit: the chat route lists MODELS (to ``url`` when given), keys alice and carol."""

    def edit(cfg: dict[str, Any]) -> None:
        cfg["listen"]["api_keys"] = [
            {"name": "alice", "key": ALICE_KEY},
            {"name": "carol", "key": CAROL_KEY, "models": [PUBLIC]},
        ]
        chat = cfg["routes"][0]
        chat["models"] = MODELS
        chat.update(route)
        if url is not None:
            cfg["credentials"]["open"] = {"type": "none"}
            chat["upstream"] = url
            chat["credential"] = "open"

    return edit


def auth(key: str = ALICE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


async def post(
    http: aiohttp.ClientSession, gw: RunningGateway, body: bytes, key: str = ALICE_KEY
) -> int:
    async with http.post(gw.url + "/v1/chat/completions", data=body, headers=auth(key)) as resp:
        await resp.read()
        return resp.status


def body_of(request: bytes) -> bytes:
    return request.split(b"\r\n\r\n", 1)[1]


# The alias appears in the content too, the model value has spaces around it, keys are in an
# unusual order, there is non-ASCII text and a number spelled 1.50: only the value may change.
CLIENT_BODY = (
    b'{"messages":[{"role":"user","content":"say \\"gpt-4o-mini\\" and caf\xc3\xa9"}],\n'
    b' "temperature" : 1.50,  "model" :  "gpt-4o-mini" , "user":"gpt-4o-mini"}'
)


async def test_alias_is_rewritten_in_the_body_and_no_other_byte_changes(
    recording: RecordingUpstream, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(aliased(recording.url))
    assert await post(http, gw, CLIENT_BODY) == 200
    expected = CLIENT_BODY.replace(b'"model" :  "gpt-4o-mini"', b'"model" :  "qwen2-7b"')
    assert expected != CLIENT_BODY
    assert body_of(recording.received[-1]) == expected
    head = recording.heads[-1]
    assert f"Content-Length: {len(expected)}" in head


@pytest.mark.parametrize(
    ("model", "upstream"), [(MODEL, MODEL), ("big", "qwen2-72b"), (PUBLIC, MODEL)]
)
async def test_each_listed_name_goes_up_as_its_upstream_name(
    model: str,
    upstream: str,
    recording: RecordingUpstream,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await make_gateway(aliased(recording.url))
    body = json.dumps(chat_body(stream=False, model=model)).encode()
    assert await post(http, gw, body) == 200
    sent = body_of(recording.received[-1])
    assert sent == body.replace(json.dumps(model).encode(), json.dumps(upstream).encode(), 1)
    if model == upstream:
        assert sent == body  # a plain name is never touched


async def test_an_upstream_name_that_is_not_listed_is_not_a_public_name(
    recording: RecordingUpstream, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(aliased(recording.url))
    body = json.dumps(chat_body(stream=False, model="qwen2-72b")).encode()
    async with http.post(gw.url + "/v1/chat/completions", data=body, headers=auth()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    assert recording.received == []


async def test_v1_models_and_key_allowlists_use_the_public_names(
    recording: RecordingUpstream, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(aliased(recording.url))
    async with http.get(gw.url + "/v1/models", headers=auth()) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == [MODEL, PUBLIC, "big"]
    async with http.get(gw.url + "/v1/models", headers=auth(CAROL_KEY)) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == [PUBLIC]
    public = json.dumps(chat_body(stream=False, model=PUBLIC)).encode()
    assert await post(http, gw, public, CAROL_KEY) == 200
    # the name the alias stands for is another model as far as the allowlist goes
    upstream = json.dumps(chat_body(stream=False, model=MODEL)).encode()
    assert await post(http, gw, upstream, CAROL_KEY) == 403
    assert len(recording.received) == 1


async def test_alias_and_include_usage_edit_one_body_and_the_openai_client_streams(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    cloud.modelarts.script.events = 3
    gw = await make_gateway(aliased(include_usage=True))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=10
    ) as client:
        stream = await client.chat.completions.create(
            model=PUBLIC, messages=[{"role": "user", "content": "hello there"}], stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    # the answer is relayed as the service sent it: vLLM names the model it was asked for
    assert {c.model for c in chunks} == {MODEL}
    sent = cloud.modelarts.requests[-1].body
    assert json.loads(sent)["model"] == MODEL
    assert sent.endswith(b',"stream_options":{"include_usage":true}}')
    labels = {"route": "chat", "key": "alice", "model": PUBLIC}
    assert gw.metric("gateway_tokens_total", **labels, kind="prompt") == 2
    assert gw.metric("gateway_tokens_total", **labels, kind="completion") == 3


async def test_a_non_utf8_body_for_an_alias_is_refused_not_sent_with_the_wrong_name(
    recording: RecordingUpstream, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(aliased(recording.url))
    body = json.dumps(chat_body(stream=False, model=PUBLIC)).encode("utf-16")
    async with http.post(gw.url + "/v1/chat/completions", data=body, headers=auth()) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "unsupported_encoding"
    assert recording.received == []


# --- start-up validation ----------------------------------------------------------------------


def problems_for(cloud: FakeCloud, models: object) -> list[str]:
    cfg: dict[str, Any] = {
        "credentials": {"main": cloud.iam_password_config()},
        "routes": [
            {"name": "chat", "upstream": cloud.service_url, "credential": "main", "models": models}
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg, {})
    return info.value.problems


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([MODEL, {"name": PUBLIC}], "routes[0].models[1].upstream: is required"),
        ([{"upstream": MODEL}], "routes[0].models[0].name: is required"),
        ([{"name": PUBLIC, "upstream": MODEL, "to": "x"}], "routes[0].models[0].to: unknown key"),
        ([MODEL, 7], "routes[0].models[1]: must be a model name or a mapping {name, upstream}"),
        ([MODEL, ""], "routes[0].models[1]: must be a model name or a mapping {name, upstream}"),
        ([{"name": PUBLIC, "upstream": ["x"]}], "routes[0].models[0].upstream: must be a string"),
        ([MODEL, {"name": MODEL, "upstream": "y"}], "routes[0].models[1]: model 'qwen2-7b' is"),
        ("qwen2-7b", "routes[0].models: must be a list"),
    ],
)
def test_bad_model_entries_stop_start_up_naming_the_dotted_key(
    cloud: FakeCloud, models: object, expected: str
) -> None:
    problems = problems_for(cloud, models)
    assert any(p.startswith(expected) for p in problems), problems


def test_an_alias_parses_into_public_names_and_an_upstream_map(cloud: FakeCloud) -> None:
    cfg: dict[str, Any] = {
        "credentials": {"main": cloud.iam_password_config()},
        "routes": [
            {"name": "chat", "upstream": cloud.service_url, "credential": "main", "models": MODELS}
        ],
    }
    route = parse_settings(cfg, {}).routes[0]
    assert route.models == (MODEL, PUBLIC, "big")
    assert route.upstream_models == {PUBLIC: MODEL, "big": "qwen2-72b"}


async def test_models_retrieve_knows_the_public_name_and_not_the_hidden_upstream_one(
    recording: RecordingUpstream, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(aliased(recording.url))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=10
    ) as client:
        assert (await client.models.retrieve(PUBLIC)).id == PUBLIC
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("qwen2-72b")  # "big" stands for it; it is not public
        assert [m.id async for m in client.models.list()] == [MODEL, PUBLIC, "big"]
    assert recording.received == []


def test_check_names_every_bad_model_entry_and_exits_2(cloud: FakeCloud, tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "credentials": {"main": cloud.iam_password_config()},
        "routes": [
            {
                "name": "chat",
                "upstream": cloud.service_url,
                "credential": "main",
                "models": [MODEL, {"name": PUBLIC}, {"name": "x", "upstream": "y", "z": 1}],
                "include_usage": "yes",
            }
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_gateway_cli("check", "--config", str(path), env=dict(os.environ))
    assert result.returncode == 2, result.stderr
    for problem in (
        "routes[0].models[1].upstream: is required",
        "routes[0].models[2].z: unknown key",
        "routes[0].include_usage: must be true or false",
    ):
        assert problem in result.stderr, result.stderr
