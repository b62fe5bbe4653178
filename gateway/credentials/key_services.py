"""Temporary AK/SK from the platform's credential services: ECS metadata and CCE pod identity.

Both answer ``{"credential": {"access", "secret", "securitytoken", "expires_at"}}``; the field
names the SDK also accepts (``credentials``, ``accessKeyId``, ``security_token``, ``expiration``,
... in ``StsAccessor._process_credential``) are read too, so a service that answers as the SDK
expects works here. Every failure becomes a FetchFailed whose reason names no secret: the
answers' bodies are never quoted (they hold the keys, or echo the request's Authorization).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from gateway.config.model import Secret
from gateway.credentials.token_cache import FetchFailed, Token

# The SDK's timeouts: MetadataAccessor (3 s connect, 3 s read), PodIdentityAccessor (5 s, 5 s).
METADATA_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=3, sock_read=3)
POD_IDENTITY_TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=5, sock_read=5)
# "X-Metadata-Token-Ttl-Seconds: 21600": the session token's life we ask for (6 h, the SDK's)
SESSION_TTL = 21600
SESSION_RENEW_EARLY = 60.0  # a cached session token is not used in its last minute
# A PUT answered with one of these: the metadata service has no session tokens (the SDK's rule)
NO_SESSION_TOKENS = (404, 405, 503)
# A 401 on securitykey with this text: no agency is bound to the server (SDK MetadataAccessor)
NO_AGENCY = "Please configure Cloud Service Agency first"
MAX_ANSWER = 64 * 1024
MAX_TOKEN_FILE = 64 * 1024


@dataclass(frozen=True)
class TemporaryKeys(Token):
    """A temporary AK (``value``), its SK and security token; ``origin`` names the source kind.

    The AK identifies the keys in the cache; neither it nor the secrets are ever shown.
    """

    secret: Secret = field(default=Secret(""), repr=False)
    security_token: Secret | None = field(default=None, repr=False)
    obtained_at: float = 0.0  # monotonic: when the source handed them out


def parse_answer(payload: bytes, origin: str) -> TemporaryKeys:
    """The keys in a metadata or pod identity answer; FetchFailed if it has none."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise FetchFailed(f"{origin} answered with a body that is not JSON") from None
    if isinstance(data, dict):
        inner = data.get("credential", data.get("credentials", data))
    else:
        inner = None
    if not isinstance(inner, dict):
        raise FetchFailed(f"{origin} answered without a credential object")
    access = _first(inner, "access", "accessKeyId", "access_key_id")
    secret = _first(inner, "secret", "secretAccessKey", "secret_access_key")
    token = _first(inner, "securitytoken", "securityToken", "security_token")
    expires = _first(inner, "expires_at", "expiration")
    if not access or not secret or not expires:
        missing = [
            n for n, v in (("access", access), ("secret", secret), ("expires_at", expires)) if not v
        ]
        raise FetchFailed(f"{origin} answered without {', '.join(missing)}")
    if not header_safe(access) or (token and not header_safe(token)):
        raise FetchFailed(f"{origin} answered with an access key or token that is not one line")
    return TemporaryKeys(
        value=access,
        expires_at=parse_expiry(expires, origin),
        origin=origin,
        secret=Secret(secret),
        security_token=Secret(token) if token else None,
        obtained_at=time.monotonic(),
    )


def header_safe(value: str) -> bool:
    """Fit for a header value: no line breaks or other control characters (nor leading spaces)."""
    return value.isprintable() and value == value.strip()


def _first(data: dict[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if value:
            return value if isinstance(value, str) else ""
    return ""


def parse_expiry(text: str, origin: str) -> float:
    """Epoch seconds of an ISO 8601 time (``2026-12-03T10:00:00.000000Z``); no zone means UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FetchFailed(f"{origin} answered with an expires_at that is not a time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, up to MAX_ANSWER (a credential answer is a few KiB)."""
    data = bytearray()
    async for chunk in resp.content.iter_any():
        data += chunk
        if len(data) > MAX_ANSWER:
            raise FetchFailed("the credential service answered with an oversized body")
    return bytes(data)


def _endpoint(base: URL, path: str) -> URL:
    """``base`` with ``path`` appended to its own path (built from parts, never glued text)."""
    return base.with_path(base.path.rstrip("/") + path, encoded=False)


class MetadataService:
    """The agency's temporary AK/SK from the ECS/CCE metadata service.

    ``PUT /meta-data/latest/api/token`` first (``X-Metadata-Token-Ttl-Seconds: 21600``); a token
    is then sent as ``X-Metadata-Token`` with ``GET /openstack/latest/securitykey``; 404, 405 or
    503 on the PUT means the service has no session tokens, so the GET goes without one. The
    session token is reused until shortly before its TTL; a 401 on the GET (other than "no agency
    bound") gets one new session token and one more GET, as the SDK's MetadataAccessor does.
    """

    def __init__(self, base: URL, session: aiohttp.ClientSession) -> None:
        self._token_url = _endpoint(base, "/meta-data/latest/api/token")
        self._keys_url = _endpoint(base, "/openstack/latest/securitykey")
        self._session = session
        self._session_token: tuple[Secret, float] | None = None  # (value, monotonic expiry)

    async def fetch(self) -> TemporaryKeys:
        try:
            token = await self._current_session_token()
            status, payload = await self._get(token)
            if status == 401 and NO_AGENCY not in payload.decode("utf-8", "replace"):
                self._session_token = None
                token = await self._new_session_token(required=True)
                status, payload = await self._get(token)
        except TimeoutError:
            raise FetchFailed("the metadata service did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed(
                f"the metadata service is unreachable ({type(exc).__name__})"
            ) from None
        if status == 401:
            if NO_AGENCY in payload.decode("utf-8", "replace"):
                raise FetchFailed(
                    "the metadata service says no agency is bound to this server (HTTP 401)"
                )
            raise FetchFailed("the metadata service refused the session token (HTTP 401)")
        if status != 200:
            raise FetchFailed(f"the metadata service answered HTTP {status} for securitykey")
        return parse_answer(payload, "ecs_metadata")

    async def _current_session_token(self) -> Secret | None:
        cached = self._session_token
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        return await self._new_session_token(required=False)

    async def _new_session_token(self, *, required: bool) -> Secret | None:
        """A new session token; None when the service has none (only allowed when not required)."""
        async with self._session.put(
            self._token_url,
            headers={"X-Metadata-Token-Ttl-Seconds": str(SESSION_TTL)},
            timeout=METADATA_TIMEOUT,
            allow_redirects=False,
        ) as resp:
            payload = await _read(resp)
            status = resp.status
        if status == 200:
            text = payload.decode("utf-8", "replace").strip()
            if not text or not header_safe(text):
                raise FetchFailed("the metadata service answered with an unusable session token")
            value = Secret(text)
            self._session_token = (value, time.monotonic() + SESSION_TTL - SESSION_RENEW_EARLY)
            return value
        if status in NO_SESSION_TOKENS and not required:
            return None
        raise FetchFailed(f"the metadata service answered HTTP {status} for a session token")

    async def _get(self, token: Secret | None) -> tuple[int, bytes]:
        headers = {"X-Metadata-Token": token.reveal()} if token is not None else {}
        async with self._session.get(
            self._keys_url, headers=headers, timeout=METADATA_TIMEOUT, allow_redirects=False
        ) as resp:
            return resp.status, await _read(resp)


def read_token_file(path: Path) -> str:
    """The pod's authorization token: the file's content, stripped (the SDK's ``_get_content``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise FetchFailed(f"cannot read token_file {path} ({exc.strerror})") from None
    if len(data) > MAX_TOKEN_FILE:
        raise FetchFailed(f"token_file {path} is too large to hold a token")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FetchFailed(f"token_file {path} is not UTF-8 text") from None
    if not text:
        raise FetchFailed(f"token_file {path} is empty")
    if not text.isprintable():
        raise FetchFailed(f"token_file {path} must hold one line (a header value)")
    return text


class PodIdentityService:
    """CCE pod identity: ``POST {uri}`` with body ``{}`` and the token file as Authorization.

    The token file is read at every fetch: the kubelet rotates it.
    """

    def __init__(self, uri: URL, token_file: Path, session: aiohttp.ClientSession) -> None:
        self._uri = uri
        self._token_file = token_file
        self._session = session

    async def fetch(self) -> TemporaryKeys:
        authorization = read_token_file(self._token_file)
        try:
            async with self._session.post(
                self._uri,
                json={},
                headers={"Authorization": authorization},
                timeout=POD_IDENTITY_TIMEOUT,
                allow_redirects=False,
            ) as resp:
                payload = await _read(resp)
                status = resp.status
        except TimeoutError:
            raise FetchFailed("pod identity did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"pod identity is unreachable ({type(exc).__name__})") from None
        if status in (401, 403):
            raise FetchFailed(
                f"pod identity refused the token in {self._token_file} (HTTP {status})"
            )
        if not 200 <= status < 300:
            raise FetchFailed(f"pod identity answered HTTP {status}")
        return parse_answer(payload, "pod_identity")
