import aiohttp
from conftest import RunningGateway, chat_body


async def test_stream_through_gateway(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
