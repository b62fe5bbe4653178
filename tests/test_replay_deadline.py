"""The 401 replay's wait for headers: a fresh first-byte time, still inside ``total``.

The token the gateway holds is revoked (the fake IAM forgets it), so the upstream answers 401 at
once; the gateway fetches a new token and sends the request again, and that attempt's headers
never come in time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from conftest import FakeCloud, GatewayFactory, chat_body

CHAT = "/v1/chat/completions"


def timeouts(**values: float) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["timeouts"].update(values)

    return edit


@pytest.mark.parametrize(
    ("first_byte", "total", "code", "bound"),
    [
        (0.4, 30, "upstream_timeout", 0.4),  # the replay's own first-byte time
        (5, 0.5, "upstream_total_timeout", 0.5),  # the request's total, both attempts together
    ],
)
async def test_a_replay_after_a_401_waits_its_first_byte_time_inside_the_total(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    first_byte: float,
    total: float,
    code: str,
    bound: float,
) -> None:
    gw = await make_gateway(timeouts(first_byte=first_byte, total=total))
    async with http.post(gw.url + CHAT, json=chat_body(stream=False)) as resp:
        assert resp.status == 200  # a token fetched and cached
    cloud.iam.revoke_all()
    cloud.modelarts.script.header_delay = 5
    seen = len(cloud.modelarts.requests)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with http.post(gw.url + CHAT, json=chat_body(stream=False)) as resp:
        took = loop.time() - start
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == code
    assert len(cloud.modelarts.requests) - seen == 2  # the 401, then the replay
    assert bound - 0.01 <= took < bound + 0.8, took
