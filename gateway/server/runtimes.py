"""Putting a config into service: credentials built or kept, the proxy's runtime swapped, and
credentials nobody uses any more closed once the requests that used them have ended.

A credential whose definition did not change is the same object afterwards, so its cached
token (and background refresh) carry on: a reload costs IAM nothing unless a credential changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config.model import Settings
from gateway.credentials import Credential, build_credentials
from gateway.metrics import Metrics
from gateway.proxy.handler import Proxy
from gateway.proxy.runtime import Runtime

log = logging.getLogger("gateway.reload")


@dataclass(frozen=True)
class Installed:
    """What an install did to the credentials, by name (for the reload's log line)."""

    kept: tuple[str, ...]
    new: tuple[str, ...]
    dropped: tuple[str, ...]


class Runtimes:
    """Owns every credential's lifetime and the proxy's current runtime."""

    def __init__(self, proxy: Proxy, metrics: Metrics) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._open: dict[int, Credential] = {}  # every started, not yet closed credential
        self._retired: set[Runtime] = set()  # replaced, but requests still use them
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> Runtime:
        return self.proxy.runtime

    async def start(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        """Build and start the first config's credentials (IAM calls go through ``session``)."""
        self._session = session
        await self.install(settings)

    async def install(self, settings: Settings) -> Installed:
        """Serve new requests with ``settings``; requests in flight finish on what they took."""
        assert self._session is not None, "start() first"
        current = self.current
        previous = {
            name: (current.settings.credentials[name], credential)
            for name, credential in current.credentials.items()
        }
        credentials = build_credentials(
            settings.credentials, self._session, self.metrics.token_refreshed, previous
        )
        fresh = [c for c in credentials.values() if id(c) not in self._open]
        started: list[Credential] = []
        try:
            for credential in fresh:
                await credential.start()
                started.append(credential)
        except BaseException:
            for credential in started:
                await credential.close()
            raise
        for credential in fresh:
            self._open[id(credential)] = credential
        old = self.proxy.swap(Runtime(settings, credentials, previous=current))
        # the upstream pools follow: a route gone or moved drops its idle connections, and a
        # changed pool_idle applies to connections already open
        self.proxy.client.follow(
            {r.name: (r.upstream, r.timeouts.pool_idle) for r in settings.routes}
        )
        kept = tuple(n for n, c in credentials.items() if previous.get(n, (None, None))[1] is c)
        dropped = tuple(n for n, c in old.credentials.items() if credentials.get(n) is not c)
        if old.users:
            self._retired.add(old)
            self._spawn(self._when_idle(old))
        else:
            await self._collect()
        return Installed(kept, tuple(c.name for c in fresh), dropped)

    async def close(self) -> None:
        """Stop everything: the app is shutting down."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for credential in list(self._open.values()):
            await credential.close()
        self._open.clear()

    async def _when_idle(self, old: Runtime) -> None:
        await old.idle.wait()
        self._retired.discard(old)
        await self._collect()

    async def _collect(self) -> None:
        """Close every credential that neither the current runtime nor a busy old one holds."""
        live = {id(c) for rt in (self.current, *self._retired) for c in rt.credentials.values()}
        for key, credential in list(self._open.items()):
            if key in live:
                continue
            del self._open[key]
            try:
                await credential.close()
            except Exception:  # the new config serves already: closing the old is best effort
                log.exception("credential %r: closing the old instance failed", credential.name)
                continue
            log.info("credential %r: old instance closed (changed or removed)", credential.name)
            if credential.name not in self.current.credentials:
                with contextlib.suppress(KeyError):  # no token was ever fetched
                    self.metrics.token_expiry.remove(credential.name)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
