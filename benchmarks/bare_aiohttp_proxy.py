"""A bare aiohttp proxy (server handler + ClientSession, no limits, logs or metrics).

The floor of what aiohttp's own machinery costs per request, for comparison with the gateway:

    python benchmarks/run.py --scenarios S3 --targets gateway \\
        --gateway-command "{python} benchmarks/bare_aiohttp_proxy.py {config}"

It reads the port and the first route's upstream from the gateway config the runner writes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import uvloop
import yaml
from aiohttp import ClientSession, TCPConnector, web

HEADERS = {"X-Auth-Token": "bench-token-not-secret", "Content-Type": "application/json"}


async def main(config: dict[str, Any]) -> None:
    port = config["listen"]["port"]
    upstream = config["routes"][0]["upstream"]
    session = ClientSession(connector=TCPConnector(limit=2000), auto_decompress=False)

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = upstream + request.raw_path
        async with session.request(request.method, url, data=body, headers=HEADERS) as up:
            if up.content_type == "text/event-stream":
                response = web.StreamResponse(
                    status=up.status, headers={"Content-Type": up.content_type}
                )
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                return response
            return web.Response(
                status=up.status, body=await up.read(), headers={"Content-Type": up.content_type}
            )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        uvloop.run(main(yaml.safe_load(f)))
