"""No request runs twice without the client knowing (issue 9, item 2).

A reused upstream connection that dies after the upstream read the whole request (it may have
started an LLM call) gets the POST's client a 502; only GET and HEAD are sent again. A pooled
connection the upstream already closed is noticed before reuse, so the race is rare. The 401
replay after a token refresh is covered in test_tokens.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory
from faulty_upstream import read_request, reset
from multidict import CIMultiDict
from yarl import URL

from gateway.http1 import NotSent, UpstreamClient

OK = b'{"ok":true}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(OK),
    OK,
)


class SecondRequestDies:
    """Answers the first request on each connection; reads the second whole, then dies.

    ``received`` lists every request line in the order the upstream read them whole.
    """

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.received: list[str] = []
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> SecondRequestDies:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for n in (1, 2):
                request = await read_request(reader)
                self.received.append(request.split(b"\r\n", 1)[0].decode())
                if n == 2:
                    break
                head_only = request.startswith(b"HEAD ")
                writer.write(ANSWER[: -len(OK)] if head_only else ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if self.fault == "reset":
            reset(writer)
        else:
            writer.close()


@pytest.fixture(params=["reset", "fin"])
async def dying(request: pytest.FixtureRequest) -> AsyncIterator[SecondRequestDies]:
    upstream = await SecondRequestDies(request.param).start()
    try:
        yield upstream
    finally:
        await upstream.close()


def open_route(url: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"] = [
            {"name": "raw", "path": "/v1", "upstream": url, "credential": "open"},
        ]

    return edit


async def test_a_post_whose_reused_connection_dies_after_sending_is_a_502_not_a_replay(
    make_gateway: GatewayFactory, dying: SecondRequestDies, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(open_route(dying.url))
    async with http.post(gw.url + "/v1/chat/completions?n=1", data=b"{}") as resp:
        assert resp.status == 200
    async with http.post(gw.url + "/v1/chat/completions?n=2", data=b"{}") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    assert dying.received == [
        "POST /v1/chat/completions?n=1 HTTP/1.1",
        "POST /v1/chat/completions?n=2 HTTP/1.1",
    ]
    assert dying.connections == 1


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_idempotent_request_whose_reused_connection_dies_is_sent_again(
    make_gateway: GatewayFactory, dying: SecondRequestDies, http: aiohttp.ClientSession, method: str
) -> None:
    gw = await make_gateway(open_route(dying.url))
    async with http.request(method, gw.url + "/v1/files?n=1") as resp:
        assert resp.status == 200
    async with http.request(method, gw.url + "/v1/files?n=2") as resp:
        assert resp.status == 200
    assert dying.received == [f"{method} /v1/files?n={n} HTTP/1.1" for n in (1, 2, 2)]
    assert dying.connections == 2


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_pooled_connection_closed_by_the_upstream_is_noticed_before_reuse(
    how: str,
) -> None:
    # The upstream closes the idle connection and the very next request is sent before the event
    # loop has run: the FIN (or RST) is in the socket but unseen. The POST must go on a new
    # connection, once. (After an RST the write itself fails too, so only the FIN case needs
    # the check before reuse; both must end the same.)
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = URL(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions")
    client = UpstreamClient()

    async def serve_one(conn: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"{}"):
            data += await loop.sock_recv(conn, 65536)
        await loop.sock_sendall(conn, ANSWER)
        return data

    async def post() -> bytes:
        response = await client.request("POST", url, CIMultiDict(), b"{}", 2.0)
        try:
            return await response.content.read()
        finally:
            response.release()

    try:
        async with asyncio.timeout(5):
            first = loop.create_task(post())
            conn1, _ = await loop.sock_accept(listener)
            await serve_one(conn1)
            assert await first == OK
            if how == "reset":
                conn1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn1.close()  # FIN or RST, now; the client's loop has not seen it yet
            second = loop.create_task(post())  # runs up to its first wait: the pool, the write
            conn2, _ = await loop.sock_accept(listener)
            assert (await serve_one(conn2)).startswith(b"POST /v1/chat/completions")
            assert await second == OK
            conn2.close()
    finally:
        await client.close()
        listener.close()


async def test_a_request_on_a_connection_already_gone_is_not_sent() -> None:
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = UpstreamClient()
    try:
        conn = await client._connect(("", "http", "127.0.0.1", port), 2.0)
        conn.close()
        with pytest.raises(NotSent):
            await conn.exchange(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"", "POST")
    finally:
        await client.close()
        listener.close()
        await listener.wait_closed()
