"""`modelarts-gateway demo`: a newcomer's first run, exactly as printed, with no cloud account."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess

import pytest
from conftest import free_port, start_gateway_process, stop_process

START_WAIT = 20.0  # bound on the demo coming up (imports on a loaded 2-core machine)


async def read_until(stream: asyncio.StreamReader, marker: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(START_WAIT):
        while marker not in seen:
            line = await stream.readline()
            assert line, f"the demo stopped printing before {marker!r}:\n{seen.decode()}"
            seen += line
    return seen


def printed_commands(text: str) -> tuple[str, str]:
    """The curl line and the python snippet, as the demo printed them."""
    curl = text[text.index("curl -N") : text.index("pip install")].rsplit("\n", 1)[0]
    start = text.index(" - <<'PY'")
    start = text.rindex("\n", 0, start) + 1
    snippet = text[start : text.index("\nPY\n", start) + 4]
    return curl.strip(), snippet.strip()


@pytest.mark.timeout(90)
async def test_demo_prints_commands_that_stream_tokens_as_printed_and_stops_on_sigint() -> None:
    port = free_port()
    proc = await start_gateway_process("demo", "--port", str(port), stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        text = (await read_until(proc.stdout, b"\nPY\n")).decode()
        assert f"http://127.0.0.1:{port}/v1" in text
        curl, snippet = printed_commands(text)

        if shutil.which("curl"):
            done = await asyncio.to_thread(
                subprocess.run, ["bash", "-c", curl], capture_output=True, timeout=30
            )
            assert done.returncode == 0
            assert b"token0" in done.stdout and done.stdout.endswith(b"data: [DONE]\n\n")

        done = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", snippet], capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        words = done.stdout.decode().split()
        assert words[:3] == ["token0", "token1", "token2"]  # streamed in order, as printed

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        await stop_process(proc)
