"""Project-scoped IAM tokens from a user name and password.

``POST {iam_url}/v3/auth/tokens`` with the password identity and a project scope; IAM answers
201 with the token in ``X-Subject-Token`` and ``token.expires_at`` in the body
(Huawei Cloud IAM API, "Obtaining an IAM User Token").
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import aiohttp

from gateway.config import IamPasswordCredential
from gateway.credentials.base import Outgoing
from gateway.credentials.token_cache import FetchFailed, RefreshListener, Token, TokenCache

IAM_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)


def password_auth_body(cfg: IamPasswordCredential) -> dict[str, Any]:
    project = {"id": cfg.project_id} if cfg.project_id else {"name": cfg.project}
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": cfg.user,
                        "password": cfg.password.reveal(),
                        "domain": {"name": cfg.domain},
                    }
                },
            },
            "scope": {"project": project},
        }
    }


async def request_token(
    session: aiohttp.ClientSession,
    iam_url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Token:
    """One ``POST /v3/auth/tokens``; every failure becomes a FetchFailed with a safe reason."""
    url = iam_url.rstrip("/") + "/v3/auth/tokens?nocatalog=true"
    try:
        async with session.post(
            url, json=body, headers=headers, timeout=IAM_TIMEOUT, allow_redirects=False
        ) as resp:
            payload = await resp.read()
            if resp.status in (401, 403):
                raise FetchFailed(
                    f"IAM refused the identity (HTTP {resp.status}{_iam_message(payload)})",
                    rejected=True,
                )
            if resp.status != 201:
                raise FetchFailed(f"IAM answered HTTP {resp.status}{_iam_message(payload)}")
            value = resp.headers.get("X-Subject-Token", "")
    except TimeoutError:
        raise FetchFailed("IAM did not answer in time") from None
    except aiohttp.ClientError as exc:
        raise FetchFailed(f"IAM unreachable ({type(exc).__name__})") from None
    if not value:
        raise FetchFailed("IAM answered without an X-Subject-Token header")
    try:
        token = json.loads(payload)["token"]
        expires_at = datetime.fromisoformat(token["expires_at"]).timestamp()
        project = (token.get("project") or {}).get("name", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FetchFailed("IAM answered with a body that has no token.expires_at") from None
    return Token(value=value, expires_at=expires_at, project=str(project))


def _iam_message(payload: bytes) -> str:
    """IAM's own error message (never contains the request's secrets), shortened."""
    try:
        message = json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {str(message)[:160]}"


class IamPassword:
    """``X-Auth-Token`` from a cached IAM password token."""

    def __init__(
        self,
        cfg: IamPasswordCredential,
        session: aiohttp.ClientSession,
        on_refresh: RefreshListener | None = None,
    ) -> None:
        self.name = cfg.name
        self._cfg = cfg
        self._session = session
        self.cache = TokenCache(
            cfg.name, self._fetch, refresh_margin=cfg.refresh_margin, on_refresh=on_refresh
        )

    async def _fetch(self) -> Token:
        return await request_token(
            self._session, str(self._cfg.iam_url), password_auth_body(self._cfg)
        )

    async def apply(self, outgoing: Outgoing) -> None:
        token = await self.cache.get()
        outgoing.headers["X-Auth-Token"] = token.value
        outgoing.credential_state = token.value

    def invalidate(self, outgoing: Outgoing) -> bool:
        if isinstance(outgoing.credential_state, str):
            self.cache.invalidate(outgoing.credential_state)
        return True

    def ready(self) -> str | None:
        return self.cache.ready()

    async def start(self) -> None:
        """Fetch the first token early so the first request does not wait; failures are logged."""
        self.cache.prefetch()

    async def close(self) -> None:
        await self.cache.close()
