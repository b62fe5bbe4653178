"""A real ``redis-server`` (Debian's package) on a free loopback port, stoppable and restartable.

No persistence (``--save '' --appendonly no``): a restart comes back empty, like a Redis
that lost its data. Start-up is awaited on the server's own "Ready to accept connections"
line, not by polling.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from conftest import free_port

READY_WAIT = 10.0


class RedisServer:
    """On a free loopback port, or with ``unix_socket`` on that socket only (no TCP at all)."""

    def __init__(self, unix_socket: str | None = None) -> None:
        self.port = 0 if unix_socket else free_port()
        self.unix_socket = unix_socket
        self.url = (
            f"unix://{unix_socket}?db=0" if unix_socket else f"redis://127.0.0.1:{self.port}/0"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server not found: apt-get install -y redis-server")
        self.proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *(
                ("--unixsocket", self.unix_socket, "--unixsocketperm", "700")
                if self.unix_socket
                else ()
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        seen: list[bytes] = []
        async with asyncio.timeout(READY_WAIT):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(b"redis-server exited:\n" + b"".join(seen))
                seen.append(line)
                if b"ready to accept connections" in line.lower():
                    break
        # keep draining its log so a full pipe never blocks it
        self._drain = asyncio.ensure_future(self._discard())
        return self

    async def _discard(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.read(65536):
            pass

    async def stop(self) -> None:
        """Kill it (as a crashed or unreachable Redis): connections drop, the port refuses."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
            await self._drain
        self.proc = None
