"""Behind nginx with its defaults (``proxy_http_version 1.0``), a cut stream stays a cut (issue 9).

nginx speaks HTTP/1.0 to the gateway unless told otherwise, so the gateway's answer to it has no
chunked framing: the body ends with the connection. Had the gateway ended a cut stream with a
FIN, nginx would take it for the end and send its own client a clean terminating chunk after half
an event. The gateway resets instead, and nginx's client sees the cut.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import GatewayFactory, free_port, stop_process
from faulty_upstream import DyingUpstream, RawClient
from test_upstream_death import FIRST, OFF, ON, raw_route

from gateway.proxy.sse import error_event

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
START_WAIT = 10.0


@pytest.fixture
async def upstream() -> AsyncIterator[DyingUpstream]:
    up = await DyingUpstream().start()
    try:
        yield up
    finally:
        await up.close()


async def start_nginx(tmp_path: Path, backend: str) -> tuple[asyncio.subprocess.Process, str]:
    """nginx in front of ``backend`` with its defaults, except buffering off (as for SSE)."""
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
    fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass {backend}; proxy_buffering off; }}
    }}
}}
""",
        encoding="utf-8",
    )
    assert NGINX is not None
    proc = await asyncio.create_subprocess_exec(
        NGINX,
        "-c",
        str(conf),
        "-p",
        str(tmp_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    # another process gives no event to await: poll its port, bounded
    async with asyncio.timeout(START_WAIT):
        while True:
            assert proc.returncode is None, "nginx exited: see its error.log"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return proc, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("boundary", [True, False])
async def test_a_stream_reset_mid_event_behind_nginx_reaches_its_client_cut(
    make_gateway: GatewayFactory, upstream: DyingUpstream, tmp_path: Path, boundary: bool
) -> None:
    gw = await make_gateway(raw_route(upstream.url))
    proc, url = await start_nginx(tmp_path, gw.url)
    try:
        upstream.framing, upstream.fault = "chunked", "reset"
        upstream.parts = [FIRST, ON if boundary else OFF]
        sent = b"".join(upstream.parts)
        client = await RawClient.post(url, "/raw/v1/chat/completions", b"{}")
        assert client.status == 200
        await client.until(len(sent))
        upstream.go.set()
        answer = await client.finish()
        if boundary:  # said inside the stream, then a clean end: the event tells
            assert (answer.body, answer.complete) == (sent + error_event("upstream_error"), True)
        else:
            assert answer.body == sent
            assert not answer.complete, "nginx's client got a clean end after half an event"
    finally:
        # SIGTERM: nginx's master stops its workers (a SIGKILL would orphan them)
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), START_WAIT)
            finally:
                await stop_process(proc)
