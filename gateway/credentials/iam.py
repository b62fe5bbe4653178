"""Project-scoped IAM tokens: from a user name and password, or through an agency.

``POST {iam_url}/v3/auth/tokens`` with the password identity (or ``assume_role``) and a project
scope; IAM answers 201 with the token in ``X-Subject-Token`` and ``token.expires_at`` in the body
(Huawei Cloud IAM API, "Obtaining an IAM User Token", "Obtaining an Agency Token").
"""

from __future__ import annotations

import asyncio
import collections
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config.model import AgencyCredential, IamPasswordCredential
from gateway.credentials.base import Outgoing, TokenSource
from gateway.credentials.cache_file import TokenCacheFile, fingerprint, password_hash
from gateway.credentials.token_cache import FetchFailed, RefreshListener, Token, TokenCache
from gateway.errors import CredentialUnavailable

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
    *,
    path: str = "/v3/auth/tokens?nocatalog=true",
    origin: str = "IAM",
) -> Token:
    """One token request (``POST /v3/auth/tokens`` unless ``path`` says otherwise); every
    failure becomes a FetchFailed with a safe reason."""
    url = iam_url.rstrip("/") + path
    try:
        async with session.post(
            url,
            json=body,
            # IAM's documented request header
            headers={"Content-Type": "application/json;charset=utf8", **(headers or {})},
            timeout=IAM_TIMEOUT,
            allow_redirects=False,
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
        project = token.get("project") or {}
        project_name, project_id = str(project.get("name", "")), str(project.get("id", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FetchFailed("IAM answered with a body that has no token.expires_at") from None
    return Token(
        value=value,
        expires_at=expires_at,
        project=project_name,
        project_id=project_id,
        origin=origin,
    )


def _iam_message(payload: bytes) -> str:
    """IAM's own error message (never contains the request's secrets), shortened.

    Keystone-style APIs answer ``{"error": {"message"}}``; IAM's ``/v3.0`` APIs answer
    ``{"error_msg", "error_code"}``.
    """
    try:
        body = json.loads(payload)
        message = body["error"]["message"] if "error" in body else body["error_msg"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {str(message)[:160]}"


class CachedToken:
    """``X-Auth-Token`` from a TokenCache, optionally backed by an on-disk ``cache_file``.

    Subclasses say how a token is fetched (``_request``) and what identity a cached file must
    match (``_identity``).
    """

    def __init__(
        self,
        name: str,
        refresh_margin: float,
        cache_file: Path | None,
        on_refresh: RefreshListener | None,
    ) -> None:
        self.name = name
        self.cache = TokenCache(
            name, self._fetch, refresh_margin=refresh_margin, on_refresh=on_refresh
        )
        self._fingerprint: str | None = None
        self._file = TokenCacheFile(name, cache_file, self.fingerprint) if cache_file else None
        self._file_loaded = False
        # tokens an upstream or IAM refused: never adopted again from a shared cache file
        self._refused: collections.deque[str] = collections.deque(maxlen=8)

    async def _request(self) -> Token:
        raise NotImplementedError

    def _identity(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable across restarts for the same identity; changes with any part of it."""
        if self._fingerprint is None:
            self._fingerprint = self._identity()  # computed once: it includes a slow hash
        return self._fingerprint

    def _load_file(self) -> None:
        """Adopt the cache file's token, once, before the first use."""
        if self._file_loaded:
            return
        self._file_loaded = True
        if self._file is not None:
            token = self._file.load()
            if token is not None:
                self.cache.seed(token)

    async def _fetch(self) -> Token:
        if self._file is None:
            return await self._request()
        # Processes sharing the file take turns: the first calls IAM and saves, the others,
        # once they hold the lock, find its token in the file and adopt it (one IAM call).
        async with self._file.lock():
            shared = self._file.load()
            if shared is not None and self._adoptable(shared):
                return shared
            token = await self._request()
            await asyncio.to_thread(self._file.save, token)
            return token

    def _adoptable(self, token: Token) -> bool:
        """Whether a token found in the file replaces ours: another one, never refused here,
        and not itself due for refresh."""
        current = self.cache.token
        if current is not None and current.value == token.value:
            return False
        return token.value not in self._refused and not self.cache.due(token)

    async def token(self) -> Token:
        """A usable token (from memory, the cache file, or a fetch)."""
        self._load_file()
        return await self.cache.get()

    def invalidate_token(self, value: str) -> None:
        if value not in self._refused:
            self._refused.append(value)
        self.cache.invalidate(value)

    async def apply(self, outgoing: Outgoing) -> None:
        token = await self.token()
        outgoing.headers["X-Auth-Token"] = token.value
        outgoing.credential_state = token.value

    def invalidate(self, outgoing: Outgoing) -> bool:
        if isinstance(outgoing.credential_state, str):
            self.invalidate_token(outgoing.credential_state)
        return True

    def ready(self) -> str | None:
        return self.cache.ready()

    async def start(self) -> None:
        """Load the cache file, else fetch the first token early; failures are logged."""
        self._load_file()
        if self.cache.usable() is None:
            self.cache.prefetch()

    async def close(self) -> None:
        await self.cache.close()


class IamPassword(CachedToken):
    """``X-Auth-Token`` from a cached IAM password token."""

    def __init__(
        self,
        cfg: IamPasswordCredential,
        session: aiohttp.ClientSession,
        on_refresh: RefreshListener | None = None,
    ) -> None:
        self._cfg = cfg
        self._session = session
        super().__init__(cfg.name, cfg.refresh_margin, cfg.cache_file, on_refresh)

    async def _request(self) -> Token:
        return await request_token(
            self._session, str(self._cfg.iam_url), password_auth_body(self._cfg)
        )

    def _identity(self) -> str:
        cfg = self._cfg
        return fingerprint(
            "iam_password",
            str(cfg.iam_url),
            cfg.domain,
            cfg.user,
            cfg.project or "",
            cfg.project_id or "",
            password_hash(cfg.password.reveal(), f"{cfg.domain}|{cfg.user}"),
        )


def agency_auth_body(cfg: AgencyCredential) -> dict[str, Any]:
    """IAM "Obtaining an Agency Token" (iam_30_0003): ``assume_role`` with a project scope."""
    role: dict[str, str] = {"agency_name": cfg.agency_name}
    if cfg.domain_id:
        role["domain_id"] = cfg.domain_id
    else:
        role["domain_name"] = cfg.domain_name or ""
    project = {"id": cfg.project_id} if cfg.project_id else {"name": cfg.project}
    return {
        "auth": {
            "identity": {"methods": ["assume_role"], "assume_role": role},
            "scope": {"project": project},
        }
    }


class Agency(CachedToken):
    """A token for another account through an agency, authorised by the ``via`` credential.

    ``POST /v3/auth/tokens`` with ``methods: ["assume_role"]`` and the via credential's token in
    ``X-Auth-Token``. If IAM refuses it, the via token may have died before its expiry (password
    or permission change), so it is dropped and the request made once more with a fresh one.
    """

    def __init__(
        self,
        cfg: AgencyCredential,
        via: TokenSource,
        session: aiohttp.ClientSession,
        on_refresh: RefreshListener | None = None,
    ) -> None:
        self._cfg = cfg
        self._via = via
        self._session = session
        super().__init__(cfg.name, cfg.refresh_margin, cfg.cache_file, on_refresh)

    async def _caller(self) -> Token:
        try:
            return await self._via.token()
        except CredentialUnavailable as exc:
            raise FetchFailed(f"via {exc.message}") from None

    async def _request(self) -> Token:
        body = agency_auth_body(self._cfg)
        url = str(self._cfg.iam_url)
        caller = await self._caller()
        try:
            return await request_token(
                self._session, url, body, headers={"X-Auth-Token": caller.value}
            )
        except FetchFailed as exc:
            if not exc.rejected:
                raise
        self._via.invalidate_token(caller.value)
        caller = await self._caller()
        return await request_token(self._session, url, body, headers={"X-Auth-Token": caller.value})

    def _identity(self) -> str:
        cfg = self._cfg
        return fingerprint(
            "agency",
            str(cfg.iam_url),
            cfg.domain_name or "",
            cfg.domain_id or "",
            cfg.agency_name,
            cfg.project or "",
            cfg.project_id or "",
            self._via.fingerprint(),
        )
