"""What one running app owns, stored on the aiohttp app under typed keys.

No module-level state: two apps in one process (as in the tests) never interfere.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.config.model import Settings
from gateway.credentials import Credential
from gateway.metrics import Metrics
from gateway.proxy.handler import Proxy


@dataclass
class Gateway:
    settings: Settings
    metrics: Metrics
    credentials: dict[str, Credential]
    proxy: Proxy


GATEWAY = web.AppKey("gateway", Gateway)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
