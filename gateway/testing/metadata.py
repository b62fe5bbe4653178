"""Fakes of the platform's temporary AK/SK services: the ECS metadata service and CCE pod identity.

Wire shapes, from huaweicloudsdkcore 3.1.219 (``auth/internal.py``: MetadataAccessor,
PodIdentityAccessor, StsAccessor._process_credential), which is what the official SDK sends and
expects, and the ECS "Obtaining Metadata" page:

- ``PUT /meta-data/latest/api/token`` with ``X-Metadata-Token-Ttl-Seconds`` answers 200 with a
  session token as plain text; a service without session tokens answers 404 (the SDK also takes
  405 and 503 to mean that).
- ``GET /openstack/latest/securitykey`` (with ``X-Metadata-Token`` when session tokens are on)
  answers ``{"credential": {"access", "secret", "securitytoken", "expires_at"}}``, the time as
  ``%Y-%m-%dT%H:%M:%S.%fZ`` (the only format the SDK parses); a missing or stale session token
  is a 401, and a server with no agency bound is a 401 saying "Please configure Cloud Service
  Agency first" (the text the SDK looks for). Keys live one hour and are replaced 10 minutes
  before they expire; both are valid in between (ECS "Obtaining Metadata", Security Key).
- Pod identity: ``POST {uri}`` with body ``{}`` and ``Authorization: <the pod's token>``; the
  answer, as the SDK's own tests (huaweicloud-sdk-python-v3 ``test_credentials.py``) have it:
  ``{"assumedAgency", "audience", "credentials": {"accessKeyId", "secretAccessKey",
  "securityToken", "expiration"}, "podIdentityAssociationId", "subject"}`` at ``/v1/credentials``;
  ``metadata_shape`` answers the metadata service's object instead (the issue describes that);
  the SDK and the gateway read both. A wrong token is a 401.

Each fake hands out fresh keys per :class:`KeyIssuer`, which registers them with the services
that must accept them (a FakeModelArts' ``aksk`` and ``security_tokens``) and can revoke them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from gateway.testing.common import serve_on_loopback
from gateway.testing.modelarts import FakeModelArts

EXPIRY_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
NO_AGENCY = "Please configure Cloud Service Agency first"


@dataclass(frozen=True)
class IssuedKeys:
    access: str
    secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expires_at: float


@dataclass
class KeyIssuer:
    """Mints temporary AK/SK + security token and makes ``services`` accept them."""

    lifetime: float = 3600.0
    services: list[FakeModelArts] = field(default_factory=list)
    issued: list[IssuedKeys] = field(default_factory=list)
    clock: Callable[[], float] = time.time

    def issue(self) -> IssuedKeys:
        keys = IssuedKeys(
            access="T" + secrets.token_hex(9).upper(),  # temporary AKs are 20 upper-case chars
            secret=secrets.token_urlsafe(30),
            security_token="gQ" + secrets.token_urlsafe(96),
            expires_at=self.clock() + self.lifetime,
        )
        for service in self.services:
            service.aksk[keys.access] = keys.secret
            service.security_tokens[keys.access] = keys.security_token
        self.issued.append(keys)
        return keys

    def revoke(self, keys: IssuedKeys) -> None:
        for service in self.services:
            service.aksk.pop(keys.access, None)
            service.security_tokens.pop(keys.access, None)

    def answer(self, keys: IssuedKeys) -> dict[str, object]:
        expires = datetime.fromtimestamp(keys.expires_at, UTC).strftime(EXPIRY_FORMAT)
        return {
            "credential": {
                "access": keys.access,
                "secret": keys.secret,
                "securitytoken": keys.security_token,
                "expires_at": expires,
            }
        }


class _Scripted:
    """What the fakes share: scripted failures, a delay, counted calls, the keys last handed out."""

    def __init__(self, issuer: KeyIssuer) -> None:
        self.issuer = issuer
        self.failures: list[int] = []  # statuses to answer before working again
        self.delay = 0.0
        self.calls = 0  # credential requests (not session-token PUTs)
        self.current: IssuedKeys | None = None
        # ECS "Obtaining Metadata" (Security Key): keys live one hour and are replaced 10 minutes
        # before they expire; until then every request gets the same keys
        self.reuse = True
        self.rotate_before = 600.0
        self.requests: list[web.Request] = []

    def _shape(self, keys: IssuedKeys) -> dict[str, object]:
        return self.issuer.answer(keys)

    async def _keys_answer(self) -> web.Response:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            status = self.failures.pop(0)
            return web.json_response({"error": "scripted failure"}, status=status)
        current = self.current
        due = current is not None and current.expires_at - self.issuer.clock() <= self.rotate_before
        if current is None or not self.reuse or due:
            current = self.current = self.issuer.issue()
        return web.json_response(self._shape(current))


class FakeMetadata(_Scripted):
    """The ECS/CCE metadata service; ``session_tokens`` False: the PUT answers 404."""

    def __init__(
        self, issuer: KeyIssuer, *, session_tokens: bool = True, agency: bool = True
    ) -> None:
        super().__init__(issuer)
        self.session_tokens = session_tokens
        self.no_token_status = 404
        self.agency = agency
        self.valid_tokens: set[str] = set()
        self.token_puts = 0
        self.ttl_asked: list[str] = []
        self.app = web.Application()
        self.app.router.add_put("/meta-data/latest/api/token", self._token)
        self.app.router.add_get("/openstack/latest/securitykey", self._securitykey)

    def expire_session_tokens(self) -> None:
        """Forget every session token handed out (their TTL ran out)."""
        self.valid_tokens.clear()

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        self.token_puts += 1
        self.ttl_asked.append(request.headers.get("X-Metadata-Token-Ttl-Seconds", ""))
        if not self.session_tokens:
            return web.Response(status=self.no_token_status, text="Not Found")
        token = secrets.token_urlsafe(32)
        self.valid_tokens.add(token)
        return web.Response(text=token)

    async def _securitykey(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        if self.session_tokens and request.headers.get("X-Metadata-Token") not in self.valid_tokens:
            return web.Response(status=401, text="Unauthorized")
        if not self.agency:
            # the body a real server answered, as reported by users who met it
            return web.Response(status=401, text=f"401 Unauthorized\n{NO_AGENCY}")
        return await self._keys_answer()


class FakePodIdentity(_Scripted):
    """CCE pod identity's agent: accepts ``Authorization`` equal to ``token``."""

    PATH = "/v1/credentials"

    def __init__(self, issuer: KeyIssuer, token: str) -> None:
        super().__init__(issuer)
        self.token = token
        self.metadata_shape = False
        self.bodies: list[bytes] = []
        self.app = web.Application()
        self.app.router.add_post(self.PATH, self._credential)

    def _shape(self, keys: IssuedKeys) -> dict[str, object]:
        if self.metadata_shape:
            return self.issuer.answer(keys)
        expires = datetime.fromtimestamp(keys.expires_at, UTC).strftime(EXPIRY_FORMAT)
        return {
            "assumedAgency": {"urn": "iam::0a1b2c:agency:modelarts", "id": "7c9d"},
            "audience": "",
            "credentials": {
                "accessKeyId": keys.access,
                "secretAccessKey": keys.secret,
                "securityToken": keys.security_token,
                "expiration": expires,
            },
            "podIdentityAssociationId": "",
            "subject": {"namespace": "default", "serviceAccount": "app"},
        }

    async def _credential(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        self.bodies.append(await request.read())
        if request.headers.get("Authorization") != self.token:
            return web.json_response({"error": "invalid token"}, status=401)
        return await self._keys_answer()


@dataclass
class Platform:
    """The metadata service and pod identity, serving on loopback, issuing keys for ``issuer``."""

    issuer: KeyIssuer
    metadata: FakeMetadata
    metadata_url: str
    pod_identity: FakePodIdentity
    pod_identity_url: str
    runners: list[web.AppRunner] = field(default_factory=list)

    async def close(self) -> None:
        while self.runners:
            await self.runners.pop().cleanup()


async def start_platform(
    services: list[FakeModelArts], pod_token: str, **metadata_options: bool
) -> Platform:
    """Start a FakeMetadata and a FakePodIdentity whose keys ``services`` accept."""
    issuer = KeyIssuer(services=services)
    metadata = FakeMetadata(issuer, **metadata_options)
    pod = FakePodIdentity(issuer, pod_token)
    md_runner, md_url = await serve_on_loopback(metadata.app)
    try:
        pod_runner, pod_url = await serve_on_loopback(pod.app)
    except BaseException:
        await md_runner.cleanup()
        raise
    return Platform(
        issuer, metadata, md_url, pod, pod_url + FakePodIdentity.PATH, [md_runner, pod_runner]
    )
