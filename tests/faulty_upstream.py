"""A raw-socket upstream that frames a body as told and then dies as told, and a raw client.

The upstream writes exactly the bytes a test gives it, in one of three framings (close-delimited,
chunked, Content-Length that is never reached), then waits for the test's signal and ends the
connection with a FIN (``close``) or a reset (``SO_LINGER`` 0, then close: an RST, no FIN).
The client reads the gateway's answer off a raw socket, decoding chunked framing itself, so a
test sees whether the terminating chunk came, not what an HTTP library makes of it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from conftest import RAW_WAIT

HEADS = {
    "close": b"Connection: close\r\n",
    "chunked": b"Transfer-Encoding: chunked\r\n",
    "length": b"Content-Length: 100000\r\n",
    "small": b"Content-Length: 2000\r\n",  # read whole before the answer goes out
}


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with an RST: what a crashed process or a load balancer sends."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def frame(framing: str, data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if framing == "chunked" and data else data


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) off the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


@dataclass
class DyingUpstream:
    """Answers each request with ``parts`` in ``framing``, then dies by ``fault`` on ``go``."""

    framing: str = "close"
    content_type: str = "text/event-stream"
    parts: list[bytes] = field(default_factory=list)
    fault: str = "fin"  # or "reset", or "end" (chunked: the terminating chunk, then FIN)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    requests: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> DyingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            self.requests += 1
            head = b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\n%b\r\n" % (
                self.content_type.encode(),
                HEADS[self.framing],
            )
            writer.write(head)
            for part in self.parts:
                writer.write(frame(self.framing, part))
            await writer.drain()
            await self.go.wait()
            if self.fault == "reset":
                reset(writer)
                return
            if self.fault == "end":  # a clean end of a chunked body, wherever the bytes stopped
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes  # the payload, chunked framing removed
    complete: bool  # the terminating chunk came (or the whole Content-Length)


class RawClient:
    """One request over a raw socket; the answer's body is read as it comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False
        self._chunked = False
        self._length: int | None = None

    @classmethod
    async def post(
        cls, url: str, path: str, body: bytes, headers: dict[str, str] | None = None
    ) -> RawClient:
        host, _, port = url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(
            b"POST %b HTTP/1.1\r\nHost: %b:%b\r\nContent-Type: application/json\r\n"
            b"%bContent-Length: %d\r\n\r\n%b"
            % (path.encode(), host.encode(), port.encode(), extra.encode(), len(body), body)
        )
        client = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_WAIT)
        lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        client.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            client.headers[name.strip().lower()] = value.strip()
        client._chunked = client.headers.get("transfer-encoding", "").lower() == "chunked"
        if "content-length" in client.headers:
            client._length = int(client.headers["content-length"])
        return client

    async def _next(self) -> bool:
        """Read one piece of body; False at the end (clean or not)."""
        reader = self.reader
        try:
            if not self._chunked:
                if self._length is not None and len(self.body) >= self._length:
                    self.complete = True
                    return False
                data = await reader.read(65536)
                if not data:
                    self.complete = self._length is None  # close-delimited: EOF is the end
                    return False
                self.body += data
                return True
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                self.complete = True
                return False
            self.body += data[:-2]
            return True
        except (asyncio.IncompleteReadError, ConnectionError):
            return False

    async def until(self, size: int) -> None:
        """Wait until ``size`` body bytes have come."""
        async with asyncio.timeout(RAW_WAIT):
            while len(self.body) < size:
                assert await self._next(), f"ended after {bytes(self.body)!r}"

    async def finish(self) -> RawResponse:
        """Read to the end of the answer (terminating chunk, or the connection closing)."""
        async with asyncio.timeout(RAW_WAIT):
            while await self._next():
                pass
        self.writer.close()
        return RawResponse(self.status, self.headers, bytes(self.body), self.complete)
