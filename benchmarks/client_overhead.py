"""CPU per request of aiohttp's ClientSession against a raw protocol with aiohttp's parser.

Why the gateway has its own upstream client (gateway/http1.py). Both loops send 5,000
sequential keep-alive requests to the same in-process server, so both figures include it:

    python benchmarks/client_overhead.py
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import uvloop
from aiohttp.http_parser import HttpResponseParser

N = 5000
BODY = b'{"id":"x","choices":[{"message":{"content":"hello"}}]}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Auth-Token: t\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


class Server(asyncio.Protocol):
    """Answers every complete request on the connection with RESPONSE."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(RESPONSE)


class RawClient(asyncio.Protocol):
    """One connection, aiohttp's C parser, nothing else."""

    _reading_paused = False
    connected = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiter: asyncio.Future[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.parser = HttpResponseParser(self, self.loop, 2**16, auto_decompress=False)  # type: ignore[arg-type]

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message in messages:
            if self.waiter is not None:
                self.waiter.set_result(message)


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"X-Auth-Token": "t", "Content-Type": "application/json"}

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for _ in range(100):  # warm up
            async with session.post(url, data=b"{}", headers=headers) as r:
                await r.read()
        start = time.process_time()
        for _ in range(N):
            async with session.post(url, data=b"{}", headers=headers) as r:
                await r.read()
        session_us = (time.process_time() - start) / N * 1e6

    transport, client = await loop.create_connection(lambda: RawClient(loop), "127.0.0.1", port)
    start = time.process_time()
    for _ in range(N):
        client.waiter = loop.create_future()
        transport.write(REQUEST)
        _, payload = await client.waiter
        await payload.read()
    raw_us = (time.process_time() - start) / N * 1e6
    transport.close()
    server.close()
    print(
        f"CPU per request, client and server together: aiohttp ClientSession {session_us:.1f} µs,"
        f" raw protocol + aiohttp parser {raw_us:.1f} µs"
    )


if __name__ == "__main__":
    uvloop.run(main())
