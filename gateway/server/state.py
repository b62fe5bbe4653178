"""What one running app owns, stored on the aiohttp app under typed keys.

No module-level state: two apps in one process (as in the tests) never interfere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.config.model import Settings
from gateway.credentials import Credential
from gateway.metrics import Metrics
from gateway.proxy.handler import Proxy
from gateway.server.reload import Reloader
from gateway.server.runtimes import Runtimes


@dataclass
class Gateway:
    metrics: Metrics
    proxy: Proxy
    runtimes: Runtimes
    reloader: Reloader | None = None  # only when serving from a config file

    @property
    def settings(self) -> Settings:
        """The config serving new requests now (a reload replaces it)."""
        return self.proxy.runtime.settings

    @property
    def credentials(self) -> Mapping[str, Credential]:
        """The credentials serving new requests now."""
        return self.proxy.runtime.credentials


GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", Settings)  # the config the app started with
METRICS = web.AppKey("metrics", Metrics)
