"""Temporary AK/SK from the platform: ``ecs_metadata``, ``pod_identity`` and ``sdk_default``.

Each request is signed exactly as ``aksk`` with ``security_token`` signs it (``aksk.Signer``);
the keys come from a TokenCache, so they are refreshed ``refresh_margin`` before their
``expires_at`` in the background, one fetch at a time, with back-off when the source fails.

``sdk_default`` walks huaweicloudsdkcore's default chain in its order (environment, profile
file, metadata service, pod identity); the first source that answers is kept for the life of the
process, as the SDK keeps the provider it found, and logged by kind, never by value.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from gateway.config import sdk_env
from gateway.config.model import (
    EcsMetadataCredential,
    PodIdentityCredential,
    SdkDefaultCredential,
    StaticKeys,
)
from gateway.credentials.aksk import Signer
from gateway.credentials.base import Outgoing
from gateway.credentials.key_services import (
    MetadataService,
    PodIdentityService,
    TemporaryKeys,
    header_safe,
)
from gateway.credentials.token_cache import (
    FetchFailed,
    RefreshListener,
    TokenCache,
    safety_point,
)

log = logging.getLogger("gateway.credentials")

# A 401 replays with new keys only if the refused ones have served this long: keys the source
# has just handed out cannot be cured by asking again, and each replay costs the source a call.
MIN_AGE_FOR_REPLAY = 30.0

Fetch = Callable[[], Awaitable[TemporaryKeys]]


class TemporaryAkSk:
    """SDK-HMAC-SHA256 signing with keys from ``fetch``, cached and refreshed ahead of expiry."""

    def __init__(
        self,
        name: str,
        fetch: Fetch,
        refresh_margin: float,
        on_refresh: RefreshListener | None,
        chain: SdkChain | None = None,
    ) -> None:
        self.name = name
        self.chain = chain  # sdk_default: which source answered
        self._source = fetch
        self._margin = refresh_margin
        self._on_refresh = on_refresh
        self.cache: TokenCache[TemporaryKeys] = TokenCache(
            name, self._fetch, refresh_margin=refresh_margin, on_refresh=self._refreshed
        )
        self._signer: tuple[TemporaryKeys, Signer] | None = None

    async def _fetch(self) -> TemporaryKeys:
        keys = await self._source()
        now = self.cache.now()
        if now >= safety_point(keys.expires_at, self._margin):
            left = keys.expires_at - now
            raise FetchFailed(f"{keys.origin} answered with keys that expire in {left:.0f} s")
        return keys

    def _refreshed(self, name: str, result: str, expires_at: float | None) -> None:
        if self._on_refresh is not None:
            # keys that never expire (environment, profile file) have no expiry to export
            finite = expires_at if expires_at is not None and math.isfinite(expires_at) else None
            self._on_refresh(name, result, finite)

    async def keys(self) -> TemporaryKeys:
        """Keys usable now (the ``token`` command shows their source and expiry)."""
        return await self.cache.get()

    def _signer_for(self, keys: TemporaryKeys) -> Signer:
        cached = self._signer
        if cached is not None and cached[0] is keys:
            return cached[1]
        signer = Signer(self.name, keys.value, keys.secret, keys.security_token)
        self._signer = (keys, signer)
        return signer

    async def apply(self, outgoing: Outgoing) -> None:
        keys = await self.cache.get()
        await self._signer_for(keys).apply(outgoing)
        outgoing.credential_state = keys

    def invalidate(self, outgoing: Outgoing) -> bool:
        """Refused: drop the keys and replay once, unless they are too new for that to help."""
        keys = outgoing.credential_state
        if not isinstance(keys, TemporaryKeys) or math.isinf(keys.expires_at):
            return False  # fixed keys (environment, profile file): asking again gives the same
        if time.monotonic() - keys.obtained_at < MIN_AGE_FOR_REPLAY:
            return False
        self.cache.invalidate(keys.value)
        return True

    def ready(self) -> str | None:
        return self.cache.ready()

    async def start(self) -> None:
        self.cache.prefetch()

    async def close(self) -> None:
        await self.cache.close()


def static_keys(keys: StaticKeys, origin: str) -> TemporaryKeys:
    """Keys found in the environment or the profile file: they never expire by themselves."""
    token = keys.security_token.reveal() if keys.security_token else ""
    if not header_safe(keys.ak) or (token and not header_safe(token)):
        # the SDK would try to send them; a header cannot carry a line break
        raise SourceBroken(f"the {origin}'s ak or security token is not a single line")
    return TemporaryKeys(
        value=keys.ak,
        expires_at=math.inf,
        origin=origin,
        secret=keys.sk,
        security_token=keys.security_token,
        obtained_at=time.monotonic(),
    )


class SourceBroken(FetchFailed):
    """A source the SDK would stop at (a malformed profile file): the chain does not go on."""


@dataclass(frozen=True)
class _Source:
    kind: str
    fetch: Fetch | None  # None: not configured (the reason says why)
    reason: str = ""


class SdkChain:
    """huaweicloudsdkcore's default chain: the first source that answers is kept."""

    def __init__(self, cfg: SdkDefaultCredential, session: aiohttp.ClientSession) -> None:
        self._cfg = cfg
        self._metadata = MetadataService(cfg.metadata.metadata_url, session)
        pod = cfg.pod_identity
        self._pod = PodIdentityService(pod.uri, pod.token_file, session) if pod else None
        self._chosen: _Source | None = None

    @property
    def chosen(self) -> str | None:
        """The kind of source in use, once one has answered."""
        return self._chosen.kind if self._chosen is not None else None

    def _sources(self) -> list[_Source]:
        cfg = self._cfg
        env = cfg.env_keys
        return [
            _Source(
                "environment",
                self._env if env is not None else None,
                f"{sdk_env.ENV_AK} and {sdk_env.ENV_SK} are not both set",
            ),
            _Source(
                "profile file",
                self._profile if cfg.profile_file is not None else None,
                f"neither {sdk_env.ENV_CREDENTIALS_FILE} nor HOME is set",
            ),
            _Source("ecs_metadata", self._metadata.fetch),
            _Source(
                "pod_identity",
                self._pod.fetch if self._pod is not None else None,
                f"{sdk_env.ENV_POD_URI} and {sdk_env.ENV_POD_TOKEN_FILE} are not both set",
            ),
        ]

    async def _env(self) -> TemporaryKeys:
        assert self._cfg.env_keys is not None
        return static_keys(self._cfg.env_keys, "environment")

    async def _profile(self) -> TemporaryKeys:
        path = self._cfg.profile_file
        assert path is not None
        try:
            keys = await asyncio.to_thread(sdk_env.read_profile, path)
        except sdk_env.UnsupportedSource as exc:
            raise SourceBroken(str(exc)) from None
        if keys is None:
            raise FetchFailed(f"{path} has no [basic] section with ak and sk")
        return static_keys(keys, "profile file")

    async def fetch(self) -> TemporaryKeys:
        chosen = self._chosen
        if chosen is not None and chosen.fetch is not None:
            return await chosen.fetch()
        reasons: list[str] = []
        for source in self._sources():
            if source.fetch is None:
                reasons.append(f"{source.kind}: {source.reason}")
                continue
            try:
                keys = await source.fetch()
            except SourceBroken as exc:
                raise FetchFailed(f"sdk_default: {exc.reason}") from None
            except FetchFailed as exc:
                reasons.append(f"{source.kind}: {exc.reason}")
                continue
            self._chosen = source
            log.info("credential %r: sdk_default uses the %s", self._cfg.name, source.kind)
            return keys
        raise FetchFailed("sdk_default: no source answered (" + "; ".join(reasons) + ")")


def ecs_metadata(
    cfg: EcsMetadataCredential, session: aiohttp.ClientSession, on_refresh: RefreshListener | None
) -> TemporaryAkSk:
    """``type: ecs_metadata``."""
    service = MetadataService(cfg.metadata_url, session)
    return TemporaryAkSk(cfg.name, service.fetch, cfg.refresh_margin, on_refresh)


def pod_identity(
    cfg: PodIdentityCredential, session: aiohttp.ClientSession, on_refresh: RefreshListener | None
) -> TemporaryAkSk:
    """``type: pod_identity``."""
    service = PodIdentityService(cfg.uri, cfg.token_file, session)
    return TemporaryAkSk(cfg.name, service.fetch, cfg.refresh_margin, on_refresh)


def sdk_default(
    cfg: SdkDefaultCredential, session: aiohttp.ClientSession, on_refresh: RefreshListener | None
) -> TemporaryAkSk:
    """``type: sdk_default``."""
    chain = SdkChain(cfg, session)
    return TemporaryAkSk(cfg.name, chain.fetch, cfg.refresh_margin, on_refresh, chain)
