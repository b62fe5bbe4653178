"""The floor: aiohttp's low-level server and the gateway's own upstream client, nothing else.

No guard, routing, limits, body checks, credential, metrics or access log: what the gateway's
building blocks cost per request before any of its own work. The gateway's S3 figure divided
by this one is the price of everything the gateway promises::

    python benchmarks/run.py --scenarios S3 --targets gateway \\
        --gateway-command "{python} benchmarks/floor_proxy.py {config}"

It reads the port and the first route's upstream from the gateway config the runner writes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import uvloop
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.http1 import UpstreamClient


async def main(config: dict[str, Any]) -> None:
    port = config["listen"]["port"]
    route = config["routes"][0]
    upstream = URL(route["upstream"])
    client = UpstreamClient()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(text="ok")
        body = await request.read()
        headers = CIMultiDict(
            {"X-Auth-Token": "bench-token-not-secret", "Content-Type": "application/json"}
        )
        up = await client.request(
            request.method, upstream.with_path(upstream.path + request.path), headers, body, 10.0
        )
        try:
            if up.content_type == "text/event-stream":
                response = web.StreamResponse(headers={"Content-Type": up.content_type})
                await response.prepare(request)
                while True:
                    chunk = await up.content.readany()
                    if not chunk:
                        break
                    await response.write(chunk)
                await response.write_eof()
                return response
            data = await up.content.read()
            return web.Response(
                status=up.status, body=data, headers={"Content-Type": up.content_type}
            )
        finally:
            up.release()

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await client.close()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        uvloop.run(main(yaml.safe_load(f)))
