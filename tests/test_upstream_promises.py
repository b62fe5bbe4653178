"""What the README promises about upstream connections, each tried against a raw upstream
(issue 9, item 7): a request whose write failed is sent once more, connect timeout, an answer
that is not HTTP, interim (1xx) answers, ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory
from faulty_upstream import RawClient, read_request
from multidict import CIMultiDict
from yarl import URL

from gateway.http1 import UpstreamClient

OK = b'{"ok":true}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(OK),
    OK,
)


PAUSE = b"<pause>"  # in an answer: what follows is written 50 ms later (a separate read)


class ScriptedUpstream:
    """Answers the n-th request it reads with ``answers[n]`` (the last one repeats).

    ``requests`` lists (connection number, request line) in the order requests were read whole;
    ``eof`` lists the connections the gateway closed (EOF seen while waiting for a request).
    """

    def __init__(self, *answers: bytes) -> None:
        self.answers = answers
        self.requests: list[tuple[int, str]] = []
        self.connections = 0
        self.eof: list[int] = []
        self.eof_seen = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    request = await read_request(reader)
                except asyncio.IncompleteReadError:
                    self.eof.append(number)
                    self.eof_seen.set()
                    return
                self.requests.append((number, request.split(b"\r\n", 1)[0].decode()))
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                for n, part in enumerate(answer.split(PAUSE)):
                    if n:
                        await asyncio.sleep(0.05)  # the pause is the scenario: a second read
                    writer.write(part)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def raw_route(url: str, **timeouts: float) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"] = [
            {
                "name": "raw",
                "path": "/v1",
                "upstream": url,
                "credential": "open",
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30, **timeouts},
            }
        ]

    return edit


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream(*request.param).start()
    try:
        yield upstream
    finally:
        await upstream.close()


# --- a request whose write failed is sent once more (the upstream never had it) ---------------


async def test_a_post_on_a_connection_reset_before_the_write_is_sent_once_on_a_new_one() -> None:
    """The first connection is reset by the upstream as soon as it is accepted, before the
    client's task gets to write (it needs a few loop turns after connecting): the write fails or
    finds the connection gone, so the POST cannot have reached the upstream and goes out again,
    once, on a new connection."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    url = URL(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions")
    client = UpstreamClient()
    try:
        async with asyncio.timeout(5):
            for _ in range(5):  # the same every time: no race is left to luck
                task = loop.create_task(
                    client.request("POST", url, CIMultiDict(), b'{"n":1}', 2.0, pool="p")
                )
                first, _ = await loop.sock_accept(listener)
                first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                first.close()  # an RST, before any byte of the request came
                accepting = loop.create_task(loop.sock_accept(listener))
                await asyncio.wait({task, accepting}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():  # not sent again: the client got the failure instead
                    accepting.cancel()
                    raise AssertionError(f"not resent: {task.exception()!r}")
                second, _ = await accepting
                data = b""
                while not data.endswith(b'{"n":1}'):
                    data += await loop.sock_recv(second, 65536)
                assert data.count(b"POST ") == 1
                await loop.sock_sendall(second, ANSWER)
                response = await task
                assert response.status == 200 and await response.content.read() == OK
                response.close()
                second.close()
    finally:
        await client.close()
        listener.close()


# --- upstream_connect_timeout ------------------------------------------------------------------


@contextlib.contextmanager
def never_accepting() -> Any:
    """The port of a listener whose connects hang: listen(0) admits one connection to the
    accept queue and none is ever accepted; later SYNs are dropped by the kernel, as with a
    blackholed address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # in progress: the test needs no answer
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_an_upstream_that_never_accepts_gets_a_504_connect_timeout_on_time(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    with never_accepting() as port:
        gw = await make_gateway(raw_route(f"http://127.0.0.1:{port}", connect=0.3))
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
            elapsed = loop.time() - start
            assert resp.status == 504
            error = (await resp.json())["error"]
        assert error["code"] == "upstream_connect_timeout" and error["type"] == "timeout"
        assert error["message"] == "could not connect to the upstream within 0.3 s"
        assert 0.3 <= elapsed < 1.5


async def test_a_first_byte_timeout_shorter_than_the_connect_timeout_bounds_the_connect_too(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """``first_byte`` counts from the request's start, connecting included: with a connect
    timeout of 5 s and a first-byte one of 0.3 s, a hanging connect ends at 0.3 s as a
    first-byte timeout, not at 5 s."""
    with never_accepting() as port:
        gw = await make_gateway(raw_route(f"http://127.0.0.1:{port}", connect=5, first_byte=0.3))
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
            elapsed = loop.time() - start
            assert resp.status == 504
            error = (await resp.json())["error"]
        assert error["code"] == "upstream_timeout", error
        assert error["message"] == "the upstream sent no response headers within 0.3 s"
        assert 0.3 <= elapsed < 1.5


# --- an answer that is not HTTP -----------------------------------------------------------------


@pytest.mark.parametrize(
    "scripted",
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n",),
        (b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",),
        (b"HTTP/1.1 200 OK\r\nBad Header Line\r\nContent-Length: 0\r\n\r\n",),
    ],
    ids=["not-http", "bad-status", "two-lengths", "bad-header"],
    indirect=True,
)
async def test_an_unparsable_answer_is_a_502_in_the_openai_shape_and_not_retried(
    make_gateway: GatewayFactory, scripted: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(raw_route(scripted.url))
    async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-Id"]
        error = (await resp.json())["error"]
    assert error == {
        "message": "the upstream's answer is not valid HTTP",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_error",
    }
    assert len(scripted.requests) == 1  # the upstream may have acted on it: never sent again
    # and the connection is not reused
    async with asyncio.timeout(5):
        await scripted.eof_seen.wait()


async def test_a_bad_chunk_mid_stream_ends_the_stream_with_an_error_not_cleanly(
    make_gateway: GatewayFactory,
) -> None:
    upstream = await ScriptedUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n9\r\ndata: a\n\n\r\n" + PAUSE + b"zz\r\n"
    ).start()
    try:
        gw = await make_gateway(raw_route(upstream.url))
        client = await RawClient.post(gw.url, "/v1/chat/completions", b"{}")
        answer = await client.finish()
    finally:
        await upstream.close()
    assert answer.status == 200
    assert answer.body.startswith(b"data: a\n\n")
    assert b"event: error\n" in answer.body and b'"code": "upstream_error"' in answer.body


# --- interim answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scripted",
    [
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + ANSWER,
        )
    ],
    indirect=True,
)
async def test_interim_answers_are_skipped_and_the_connection_stays_in_step(
    make_gateway: GatewayFactory, scripted: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(raw_route(scripted.url))
    for _ in range(3):
        async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            assert await resp.read() == OK
            assert "Link" not in resp.headers  # the 103's headers are not the answer's
    assert [n for n, _ in scripted.requests] == [1, 1, 1]  # one connection, reused


@pytest.mark.parametrize(
    "scripted",
    [(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",)],
    indirect=True,
)
async def test_an_unasked_protocol_switch_is_a_502(
    make_gateway: GatewayFactory, scripted: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(raw_route(scripted.url))
    async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_error"


# --- Connection: close from the upstream -------------------------------------------------------


@pytest.mark.parametrize(
    "scripted",
    [
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(OK), OK),
        )
    ],
    indirect=True,
)
async def test_connection_close_from_the_upstream_is_honoured(
    make_gateway: GatewayFactory, scripted: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    # the upstream says close but keeps its end open: reusing it would put a second request on it
    gw = await make_gateway(raw_route(scripted.url))
    for _ in range(2):
        async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200 and await resp.read() == OK
            assert "Connection" not in resp.headers or resp.headers["Connection"] != "close"
    assert [n for n, _ in scripted.requests] == [1, 2]
    async with asyncio.timeout(5):
        while len(scripted.eof) < 2:
            scripted.eof_seen.clear()
            await scripted.eof_seen.wait()
    assert sorted(scripted.eof) == [1, 2]  # the gateway closed each one itself
    assert gw.metric("gateway_upstream_connections", route="raw", state="idle") == 0
