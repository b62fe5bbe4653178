"""Reloading the config file: on SIGHUP, and every ``config_watch`` when its content changed.

A new config is validated whole before anything changes: a config with any problem is refused,
every problem logged with its dotted key, and the running one keeps serving. What only a restart
can change (the listening socket and the server's connection settings) is logged as such and
keeps its running value; the rest applies to the next request (see ``Runtimes.install``).

The file is read by path each time, never kept open: a Kubernetes ConfigMap update swaps a
symlink (``..data``) to a new directory, which an open file descriptor would never see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.config.load import ConfigError, parse_config, read_config
from gateway.config.model import Settings
from gateway.metrics import Metrics
from gateway.proxy.guard import check_exposure
from gateway.server.runtimes import Installed, Runtimes

log = logging.getLogger("gateway.reload")

UNREADABLE = "unreadable"  # the watch's digest while the file cannot be read

# Settings bound when the server starts, by dotted key: the socket (host, port, backlog) and
# what the server's connection handling was built with (gateway/_aiohttp.py's GatewayRunner).
# A change to one is logged and keeps the running value; the rest of the new config applies.
RESTART_KEYS = (
    "listen.host",
    "listen.port",
    "listen.backlog",
    "listen.header_timeout",
    "listen.keepalive_timeout",
    "listen.max_connections",
    "listen.reuse_port",
    "listen.metrics_port",
    "limits_store",  # the store's counts and connection live as long as the process
)


def _unchanged(settings: Settings) -> Settings:
    return settings


def digest(text: str) -> str:
    """What "the content changed" compares."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ConfigSource:
    """Where a reload reads the config: the file, the environment for ``${VAR}``, and the
    command line's overrides (``--port``), applied to every reload as at start."""

    path: Path
    environ: Mapping[str, str]
    overrides: Callable[[Settings], Settings] = _unchanged
    digest: str = ""  # of the text the running config came from ("" = unknown)


@dataclass
class _Watch:
    digest: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Reloader:
    """Re-reads ``source`` on request (SIGHUP) and, with ``config_watch``, when it changed."""

    def __init__(self, source: ConfigSource, runtimes: Runtimes, metrics: Metrics) -> None:
        self.source = source
        self.runtimes = runtimes
        self.metrics = metrics
        self._lock = asyncio.Lock()  # one reload at a time, in the order asked
        self._watch = _Watch(source.digest)
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Begin watching the file (a no-op loop while ``config_watch`` is 0)."""
        self._spawn(self._watch_loop())

    def request(self, why: str = "SIGHUP") -> None:
        """Reload soon (from a signal handler: nothing is awaited here)."""
        self._spawn(self.reload(why))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self, why: str, text: str | None = None) -> bool:
        """Read, validate and apply the config file; True if the new config now serves."""
        async with self._lock:
            try:
                if text is None:
                    self._watch.digest = UNREADABLE  # until read: an error is reported once
                    text = read_config(self.source.path)
                self._watch.digest = digest(text)
                running = self.runtimes.current.settings
                installed = await self._apply(text)
            except ConfigError as exc:
                self.metrics.config_reloads.labels("error").inc()
                log.error(
                    "config reload (%s) refused, the running config stays: %d problem(s)",
                    why,
                    len(exc.problems),
                )
                for problem in exc.problems:
                    log.error("config reload: %s", problem)
                return False
            except Exception:  # a bug must not kill the watch, nor leave a half-applied config
                self.metrics.config_reloads.labels("error").inc()
                log.exception("config reload (%s) failed, the running config stays", why)
                return False
            self.metrics.config_reloads.labels("ok").inc()
            summary = _summary(running, self.runtimes.current.settings, installed)
            log.info("config reloaded (%s): %s", why, summary)
            self._watch.wake.set()  # config_watch itself may have changed
            return True

    async def _apply(self, text: str) -> Installed:
        running = self.runtimes.current.settings
        new = self.source.overrides(parse_config(text, self.source.path, self.source.environ))
        for key in RESTART_KEYS:
            before, after = _get(running, key), _get(new, key)
            if before != after:
                log.warning(
                    "config reload: %s changed (%s -> %s), which needs a restart;"
                    " it stays %s until then",
                    key,
                    _shown(before),
                    _shown(after),
                    _shown(before),
                )
                new = _put(new, key, before)
        exposure = check_exposure(new.listen)  # the host that really listens, keys now
        if exposure:
            raise ConfigError([exposure])
        try:
            return await self.runtimes.install(new)
        except Exception as exc:  # a credential that cannot start: nothing was swapped
            raise ConfigError([f"credentials: cannot start ({type(exc).__name__})"]) from None

    async def _watch_loop(self) -> None:
        watch = self._watch
        while True:
            interval = self.runtimes.current.settings.config_watch
            watch.wake.clear()
            if not interval:
                await watch.wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.wake.wait(), interval)
                continue  # reloaded meanwhile: start over with its config_watch
            try:
                text: str | None = read_config(self.source.path)
            except ConfigError:
                text = None  # unreadable: reload() reads again and reports why, once
            if (digest(text) if text is not None else UNREADABLE) != watch.digest:
                await self.reload("config_watch", text)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _get(settings: object, key: str) -> Any:
    """The value at dotted ``key`` (``listen.port``) of the settings."""
    for name in key.split("."):
        settings = getattr(settings, name)
    return settings


def _put(settings: Any, key: str, value: object) -> Any:
    """A copy of the (frozen) settings with dotted ``key`` set to ``value``."""
    name, _, rest = key.partition(".")
    inner = _put(getattr(settings, name), rest, value) if rest else value
    return replace(settings, **{name: inner})


def _shown(value: object) -> str:
    """A listen value as config writes it (30, not 30.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _summary(old: Settings, new: Settings, installed: Installed) -> str:
    """What changed, by config names only (never a key or a secret)."""
    parts = [
        _diff("api keys", _keys(old), _keys(new)),
        _diff("routes", {r.name: r for r in old.routes}, {r.name: r for r in new.routes}),
    ]
    creds = []
    for label, names in (
        ("kept", installed.kept),
        ("new", installed.new),
        ("dropped", installed.dropped),
    ):
        if names:
            creds.append(f"{label} {' '.join(names)}")
    parts.append(f"credentials: {'; '.join(creds) or 'none'}")
    return ", ".join(parts)


def _keys(settings: Settings) -> dict[str, object]:
    return {k.name: k for k in settings.listen.api_keys}


def _diff(what: str, old: Mapping[str, object], new: Mapping[str, object]) -> str:
    """``what: +added -removed ~changed`` (or ``unchanged``)."""
    marks = [f"+{n}" for n in new if n not in old]
    marks += [f"-{n}" for n in old if n not in new]
    marks += [f"~{n}" for n in new if n in old and new[n] != old[n]]
    return f"{what}: {' '.join(marks) or 'unchanged'}"
