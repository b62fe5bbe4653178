"""The lean upstream client: keep-alive reuse, stale connections, framing, TLS, bad headers."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import GatewayFactory, free_port
from multidict import CIMultiDict
from yarl import URL

from gateway import http1
from gateway.http1 import BadHeader, ConnectFailed, UpstreamClient
from gateway.testing import serve_on_loopback


class Recorder:
    """A tiny upstream that records which client connection (peer port) each request came on."""

    def __init__(self) -> None:
        self.peers: list[int] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.append(peer[1] if peer else -1)
        await request.read()
        kind = request.query.get("kind", "json")
        if kind == "empty":
            return web.Response(status=204)
        if kind == "chunked":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(b"data: %d\n\n" % i)
                if request.query.get("pause"):
                    await asyncio.sleep(float(request.query["pause"]))
            return response
        return web.json_response({"path": request.path, "method": request.method})


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    upstream = Recorder()
    runner, url = await serve_on_loopback(upstream.app)
    try:
        yield upstream, url
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    try:
        yield c
    finally:
        await c.close()


async def fetch(client: UpstreamClient, url: str, method: str = "GET") -> tuple[int, bytes]:
    response = await client.request(method, URL(url), CIMultiDict(), b"", 2.0)
    try:
        return response.status, await response.content.read()
    finally:
        response.release()


async def test_a_connection_is_reused_for_requests_one_after_another(
    recorder: tuple[Recorder, str], client: UpstreamClient
) -> None:
    upstream, url = recorder
    for _ in range(5):
        status, body = await fetch(client, url + "/v1/x", "POST")
        assert status == 200 and b'"method": "POST"' in body
    assert len(set(upstream.peers)) == 1


async def test_a_response_not_read_to_its_end_is_not_reused(
    recorder: tuple[Recorder, str], client: UpstreamClient
) -> None:
    upstream, url = recorder
    slow = URL(url + "/a?kind=chunked&pause=0.2")
    response = await client.request("GET", slow, CIMultiDict(), b"", 2)
    response.release()  # body not all here: the connection cannot carry another request
    await fetch(client, url + "/b")
    assert len(set(upstream.peers)) == 2


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(
    client: UpstreamClient,
) -> None:
    upstream = Recorder()
    runner = web.AppRunner(upstream.app, keepalive_timeout=0.05, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        assert (await fetch(client, url + "/1"))[0] == 200
        await asyncio.sleep(0.3)  # the upstream's keep-alive timeout passes: it closes
        assert (await fetch(client, url + "/2"))[0] == 200
        assert len(set(upstream.peers)) == 2
    finally:
        await runner.cleanup()


async def test_bodyless_answers_and_head(
    recorder: tuple[Recorder, str], client: UpstreamClient
) -> None:
    _, url = recorder
    assert await fetch(client, url + "/x?kind=empty") == (204, b"")
    assert await fetch(client, url + "/x", "HEAD") == (200, b"")
    assert (await fetch(client, url + "/x"))[0] == 200  # the connection is still in step


async def test_a_header_value_with_a_line_break_is_refused_before_sending(
    recorder: tuple[Recorder, str], client: UpstreamClient
) -> None:
    upstream, url = recorder
    headers = CIMultiDict({"X-Auth-Token": "token\r\nX-Injected: 1"})
    with pytest.raises(BadHeader):
        await client.request("GET", URL(url + "/x"), headers, b"", 2)
    assert upstream.peers == []


async def test_a_closed_port_is_connect_failed(client: UpstreamClient) -> None:
    url = URL(f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(ConnectFailed):
        await client.request("GET", url, CIMultiDict(), b"", 2)


async def test_a_token_with_a_newline_becomes_a_502_not_a_split_request(
    make_gateway: GatewayFactory, recorder: tuple[Recorder, str], http: aiohttp.ClientSession
) -> None:
    upstream, url = recorder

    def edit(config: dict[str, object]) -> None:
        config["credentials"] = {"bad": {"type": "token", "token": "abc\nX-Injected: yes"}}
        config["routes"] = [{"name": "r", "path": "/v1", "upstream": url, "credential": "bad"}]

    gw = await make_gateway(edit)
    async with http.post(gw.url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "invalid_header"
    assert "abc" not in str(body)
    assert upstream.peers == []


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_https_upstream_with_certificate_verification(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    upstream = Recorder()
    runner = web.AppRunner(upstream.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # unknown issuer: refused, as a real client must
        untrusting = UpstreamClient()
        try:
            with pytest.raises(ConnectFailed):
                await untrusting.request(
                    "GET", URL(f"https://localhost:{port}/x"), CIMultiDict(), b"", 5
                )
        finally:
            await untrusting.close()
        # trusted (the system store honours SSL_CERT_FILE): served, and reused
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = UpstreamClient()
        try:
            for _ in range(2):
                assert (await fetch(trusting, f"https://localhost:{port}/x"))[0] == 200
        finally:
            await trusting.close()
        assert len(set(upstream.peers)) == 1
    finally:
        await runner.cleanup()


def _reference_head(method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> bytes:
    """The request head as the client built it line by line before it was joined in C."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1"]
    if "Host" not in headers:
        lines.append(f"Host: {url.host_port_subcomponent}")
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE"])
@pytest.mark.parametrize("body", [b"", b'{"a":1}'])
@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("X-Auth-Token", "t")],
        [("Host", "other.example:8443"), ("A", "1"), ("a", "2"), ("Empty", "")],
        [("X-Caf\u00e9", "v\u00e9"), ("X-Raw", "\udcff"), ("Accept", "*/*")],
    ],
)
def test_the_request_head_is_byte_for_byte_what_the_line_by_line_build_gave(
    method: str, body: bytes, pairs: list[tuple[str, str]]
) -> None:
    url = URL("https://svc.example.com:8443/v1/infers/x/v1/chat?y=1")
    headers = CIMultiDict(pairs)
    assert http1._request_head(method, url, headers, body) == _reference_head(
        method, url, headers, body
    )
