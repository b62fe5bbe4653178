"""Issue 8's two figures, measured against a gateway process (any checkout's Python).

1. stall: how long a large JSON body (7.4 MiB, whose ``model`` the gateway must read for a
   model-restricted key) holds up another client's running stream. A local upstream streams one
   SSE event every 5 ms through the gateway; the largest gap between events while the body is
   posted is compared with the largest gap before it.
2. held: how many keyless clients that got a 401 are still connected after a while; with
   ``--fd-limit`` the gateway runs under that RLIMIT_NOFILE, and whether a valid key holder
   then still gets an answer is printed too.

    python benchmarks/hostile.py --python /work/main/.venv/bin/python --cwd /work/main

Not part of the test suite; numbers depend on the machine (this one is shared: expect noise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml
from aiohttp import ClientSession, ClientTimeout, web

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-hostile-key-0123456789"
TOKEN = "bench-token-not-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def upstream_app() -> tuple[web.AppRunner, int]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body[:200]:
            return web.json_response({"id": "x", "choices": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(request.query.get("n", "600"))):
            await response.write(b'data: {"i":%d}\n\n' % i)
            await asyncio.sleep(0.005)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def start_gateway(
    python: str, cwd: str, up_port: int, fd_limit: int | None, work: Path
) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    config = {
        "listen": {
            "host": "127.0.0.1",
            "port": port,
            "api_keys": [{"name": "bench", "key": KEY, "models": ["m-allowed"]}],
        },
        "credentials": {"tok": {"type": "token", "token": TOKEN}},
        "routes": [
            {
                "name": "chat",
                "path": "/v1",
                "upstream": f"http://127.0.0.1:{up_port}/v1/infers/bench",
                "credential": "tok",
                "models": ["m-allowed"],
                "max_body": "32MiB",
                "timeouts": {"first_byte": 30, "idle": 30},
            }
        ],
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    def limit() -> None:
        if fd_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    log = (work / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        python,
        "-m",
        "gateway",
        "--config",
        str(path),
        cwd=cwd,
        stdout=log,
        stderr=log,
        preexec_fn=limit,
    )
    url = f"http://127.0.0.1:{port}"
    async with ClientSession() as s:
        for _ in range(400):
            try:
                async with s.get(url + "/healthz") as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
            await asyncio.sleep(0.025)
    raise SystemExit(f"gateway did not start, see {work / 'gateway.log'}")


def big_body() -> bytes:
    messages = [{"role": "user", "content": f"hello number {i}"} for i in range(165_000)]
    body = json.dumps({"model": "m-allowed", "messages": messages}, separators=(",", ":"))
    return body.encode()


async def one_round(
    s: ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float, float]:
    """(largest gap before, largest gap while the large body is posted, post time), in ms."""
    arrivals: list[float] = []
    posted: list[float] = []

    async def stream() -> None:
        data = b'{"model":"m-allowed","stream":true}'
        async with s.post(url + "/v1/chat?n=400", data=data, headers=headers) as r:
            async for _ in r.content:
                arrivals.append(time.monotonic())

    async def big() -> None:
        await asyncio.sleep(0.6)
        posted.append(time.monotonic())
        async with s.post(url + "/v1/chat", data=body, headers=headers) as r:
            assert r.status == 200, r.status
            await r.read()
        posted.append(time.monotonic())

    await asyncio.gather(stream(), big())
    start, end = posted
    pairs = list(itertools.pairwise(arrivals))
    before = max(b - a for a, b in pairs if b < start)
    during = max(b - a for a, b in pairs if b >= start and a <= end + 0.05)
    return before * 1000, during * 1000, (end - start) * 1000


async def stall(url: str, rounds: int) -> list[tuple[float, float, float]]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = big_body()
    print(f"large body: {len(body) / 2**20:.1f} MiB")
    async with ClientSession(timeout=ClientTimeout(total=120)) as s:
        # warm-up: the gateway's worker process (if any) starts on the first large body
        async with s.post(url + "/v1/chat", data=body, headers=headers) as r:
            await r.read()
        return [await one_round(s, url, body, headers) for _ in range(rounds)]


async def held(url: str, clients: int, wait: float) -> tuple[int, str]:
    host = url.removeprefix("http://")
    conns = []
    for _ in range(clients):
        try:
            r, w = await asyncio.open_connection(*host.split(":"))
        except OSError:
            break
        w.write(f"GET /v1/chat HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        conns.append((r, w))
    for r, _ in conns:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError, TimeoutError):
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    await asyncio.sleep(wait)
    still = 0
    for r, _ in conns:
        try:
            data = await asyncio.wait_for(r.read(65536), 0.05)
            if data:  # the rest of the 401 body: still open unless EOF follows
                data = await asyncio.wait_for(r.read(65536), 0.05)
            if data != b"":
                still += 1
        except TimeoutError:
            still += 1  # nothing, not closed: held
        except OSError:
            pass
    async with ClientSession(timeout=ClientTimeout(total=5)) as s:
        headers = {"Authorization": f"Bearer {KEY}"}
        try:
            async with s.post(url + "/v1/chat", json={"model": "m-allowed"}, headers=headers) as r:
                valid = f"valid key holder: HTTP {r.status}"
        except Exception as exc:  # what the key holder sees, whatever it is
            valid = f"valid key holder: {type(exc).__name__}"
    for _, w in conns:
        w.close()
    return still, valid


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--cwd", default=str(ROOT))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=113)
    p.add_argument("--fd-limit", type=int, default=128)
    p.add_argument("--wait", type=float, default=2.0)
    args = p.parse_args()
    up, up_port = await upstream_app()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, url = await start_gateway(args.python, args.cwd, up_port, None, work)
        try:
            for before, during, took in await stall(url, args.rounds):
                print(
                    f"stream gap: largest {before:.1f} ms before the large body, "
                    f"{during:.1f} ms while it was posted (post took {took:.0f} ms)"
                )
        finally:
            proc.terminate()
            await proc.wait()
        proc, url = await start_gateway(args.python, args.cwd, up_port, args.fd_limit, work)
        try:
            still, valid = await held(url, args.clients, args.wait)
            print(
                f"keyless clients still connected {args.wait:g} s after their 401: "
                f"{still} of {args.clients} (fd limit {args.fd_limit}); {valid}"
            )
        finally:
            proc.terminate()
            await proc.wait()
    await up.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
