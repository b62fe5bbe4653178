"""Serving: start, tell systemd, wait for a signal, then drain like a good citizen.

SIGTERM and SIGINT stop; SIGHUP re-reads the config file (``gateway/server/reload.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from gateway.config.model import Settings
from gateway.config.risks import start_up_risks
from gateway.server import gc_tuning
from gateway.server.app import FINAL_WRITE_GRACE, build_app, make_runner
from gateway.server.metrics_site import start_metrics_site
from gateway.server.reload import ConfigSource
from gateway.server.state import GATEWAY
from gateway.server.supervisor import watch_parent
from gateway.server.systemd import notify

log = logging.getLogger("gateway")


async def drain(runner: web.AppRunner, grace: float, hurry: asyncio.Event) -> None:
    """Stop like a good citizen: not ready, no new connections, let streams finish, then stop.

    Streams still open after ``grace`` (or at a second signal) end with an ``event: error``
    whose code is ``shutdown``, so a client can tell the cut from a clean end.
    """
    proxy = runner.app[GATEWAY].proxy
    proxy.draining = True
    for site in list(runner.sites):
        await site.stop()
    if proxy.in_flight:
        log.info("draining %d request(s), for up to %g s", proxy.in_flight, grace)
        waiters = [asyncio.ensure_future(proxy.idle.wait()), asyncio.ensure_future(hurry.wait())]
        await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    if proxy.relays:
        log.info("ending %d stream(s) still open", len(proxy.relays))
        for relay in list(proxy.relays):
            relay.stop("shutdown")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_WRITE_GRACE):
                await proxy.idle.wait()
    await runner.cleanup()


async def serve(
    settings: Settings,
    *,
    source: ConfigSource | None = None,
    notify_socket: str | None = None,
    started: Callable[[list[str]], None] | None = None,
    worker: int = 0,
    parent_fd: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, drain, and return (the CLI then exits 0).

    With ``source`` (the config file), SIGHUP reloads it. ``worker`` is this process's index
    among several sharing the port (``--workers``, the systemd template unit): its metrics port
    is ``listen.metrics_port + worker``. Under a ``--workers`` supervisor, ``parent_fd`` is the
    pipe whose EOF means the supervisor is gone: treated as a first SIGTERM.
    """
    for risk in start_up_risks(settings):
        log.warning("%s", risk)
    app = build_app(settings, source=source)
    gateway = app[GATEWAY]
    runner = make_runner(app)
    await runner.setup()
    signals = 0
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        (stop if signals == 1 else hurry).set()

    loop = asyncio.get_running_loop()
    handled = [signal.SIGTERM, signal.SIGINT]
    for sig in handled:
        loop.add_signal_handler(sig, on_signal)
    if gateway.reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, gateway.reloader.request)
        handled.append(signal.SIGHUP)
    if parent_fd is not None:
        watch_parent(parent_fd, on_signal)
    side: web.AppRunner | None = None
    try:
        try:
            listen = settings.listen
            site = web.TCPSite(
                runner,
                listen.host,
                listen.port,
                backlog=listen.backlog,
                reuse_port=listen.reuse_port or None,
            )
            await site.start()
            side = await start_metrics_site(app, worker)
        except BaseException:
            await runner.cleanup()
            raise
        addresses = [_address(s) for s in runner.addresses]
        log.info("serving on %s", ", ".join(addresses))
        gc_tuning.settle()
        notify(notify_socket, "READY=1")
        if started is not None:
            started(addresses)
        await stop.wait()
        log.info("stopping")
        loop.remove_signal_handler(signal.SIGHUP)  # no reload while draining
        notify(notify_socket, "STOPPING=1")
        # the grace of the config serving now: a reload may have changed it
        await drain(runner, gateway.settings.listen.shutdown_grace, hurry)
    finally:
        if side is not None:
            await side.cleanup()
        for sig in handled:
            loop.remove_signal_handler(sig)


def _address(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    return str(sockname)
