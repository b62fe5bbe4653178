"""Credentials that never change: a fixed token, or nothing at all."""

from __future__ import annotations

from gateway.config import Secret
from gateway.credentials.base import Outgoing


class StaticToken:
    """Sends a configured token as ``X-Auth-Token``; a refusal cannot be cured by retrying."""

    def __init__(self, name: str, token: Secret) -> None:
        self.name = name
        self._token = token

    async def apply(self, outgoing: Outgoing) -> None:
        outgoing.headers["X-Auth-Token"] = self._token.reveal()

    def invalidate(self, outgoing: Outgoing) -> bool:
        return False

    def ready(self) -> str | None:
        return None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class NoAuth:
    """For services deployed without authentication (and for local testing)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def apply(self, outgoing: Outgoing) -> None:
        pass

    def invalidate(self, outgoing: Outgoing) -> bool:
        return False

    def ready(self) -> str | None:
        return None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
