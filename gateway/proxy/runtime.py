"""One config's worth of what a request reads, swapped whole when the config is reloaded.

A request takes the current :class:`Runtime` once, when it arrives, and uses only that one until
it ends: a reload changes what the next request sees, never the middle of one in flight (its
key, route, credential and limits stay those it started with).

The concurrency counters are the exception, on purpose: they count requests, not configs, so a
route or key keeps its one counter across reloads (only its limit changes). Otherwise a reload
would reset every count to zero and let a key run twice its limit until the old requests end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from gateway.config.model import Settings
from gateway.credentials import Credential
from gateway.proxy.guard import Guard
from gateway.proxy.limits import BodyBudget, ConcurrencyLimit
from gateway.proxy.redact import config_secrets
from gateway.proxy.routing import Router
from gateway.proxy.target import UpstreamBase

_Pool = dict[str, ConcurrencyLimit]


class Runtime:
    """The settings and everything derived from them; nothing here changes after it is built
    except the count of requests using it (``users``) and the shared concurrency counters."""

    __slots__ = (
        "_key_pool",
        "_route_pool",
        "bases",
        "body_budget",
        "credentials",
        "guard",
        "idle",
        "key_digests",
        "key_limits",
        "route_limits",
        "router",
        "secrets",
        "settings",
        "users",
    )

    def __init__(
        self,
        settings: Settings,
        credentials: Mapping[str, Credential],
        previous: Runtime | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        listen = settings.listen
        self.router = Router(settings.routes)
        self.guard = Guard(listen)
        self._route_pool: _Pool = previous._route_pool if previous is not None else {}
        self._key_pool: _Pool = previous._key_pool if previous is not None else {}
        self.route_limits = _limits(
            self._route_pool,
            {r.name: (r.max_concurrency, f"route {r.name!r}") for r in settings.routes},
        )
        self.key_limits = _limits(
            self._key_pool,
            {
                k.name: (k.max_concurrency, f"API key {k.name!r}")
                for k in listen.api_keys
                if k.max_concurrency
            },
        )
        self.bases = {r.name: UpstreamBase(r.upstream) for r in settings.routes}
        self.secrets = config_secrets(settings.credentials)
        self.key_digests = frozenset(k.sha256 for k in listen.api_keys)
        # one budget for all request bodies held, whichever config they arrived under
        self.body_budget: BodyBudget = (
            previous.body_budget if previous is not None else BodyBudget(0)
        )
        self.body_budget.limit = listen.max_buffered_body
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        """A request starts using this runtime."""
        self.users += 1
        self.idle.clear()

    def leave(self) -> None:
        """A request that used this runtime has ended."""
        self.users -= 1
        if not self.users:
            self.idle.set()


def _limits(pool: _Pool, wanted: Mapping[str, tuple[int, str]]) -> dict[str, ConcurrencyLimit]:
    """The counters for ``wanted`` (name → limit, what), kept in ``pool`` across runtimes.

    A counter whose name left the config stays in the pool while requests still hold it, so a
    name that comes back finds its count.
    """
    for name in [n for n, limit in pool.items() if n not in wanted and not limit.active]:
        del pool[name]
    view: dict[str, ConcurrencyLimit] = {}
    for name, (limit, what) in wanted.items():
        counter = pool.get(name)
        if counter is None:
            counter = pool[name] = ConcurrencyLimit(limit, what)
        else:
            counter.limit = limit
        view[name] = counter
    return view
