"""Credential sources, chosen by the config's ``type``.

``build_credential`` is the one place that maps a credential's config to its implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiohttp

from gateway.config.model import (
    AgencyCredential,
    AkSkCredential,
    ApiKeyCredential,
    AppAkSkCredential,
    AppCodeCredential,
    CredentialConfig,
    EcsMetadataCredential,
    IamPasswordCredential,
    NoCredential,
    PodIdentityCredential,
    SdkDefaultCredential,
    StaticTokenCredential,
    TokenFileCredential,
    WorkloadIdentityCredential,
)
from gateway.credentials import temporary_aksk
from gateway.credentials.aksk import Signer
from gateway.credentials.base import Credential, Outgoing, TokenSource
from gateway.credentials.iam import Agency, IamPassword
from gateway.credentials.static import ApiKey, AppCode, NoAuth, StaticToken, TokenFile
from gateway.credentials.token_cache import RefreshListener
from gateway.credentials.workload_identity import WorkloadIdentity

__all__ = ["Credential", "Outgoing", "TokenSource", "build_credential", "build_credentials"]


def build_credential(
    cfg: CredentialConfig,
    session: aiohttp.ClientSession,
    on_refresh: RefreshListener | None,
    resolve: Callable[[str], Credential] | None = None,
) -> Credential:
    """The credential for ``cfg``; ``resolve(name)`` gives an agency its ``via`` credential."""
    match cfg:
        case IamPasswordCredential():
            return IamPassword(cfg, session, on_refresh)
        case AgencyCredential():
            via = resolve(cfg.via) if resolve is not None else None
            if not isinstance(via, TokenSource):
                raise TypeError(f"credential {cfg.name!r}: via {cfg.via!r} yields no token")
            return Agency(cfg, via, session, on_refresh)
        case StaticTokenCredential():
            return StaticToken(cfg.name, cfg.token)
        case TokenFileCredential():
            return TokenFile(cfg.name, cfg.token_file)
        case ApiKeyCredential():
            return ApiKey(cfg.name, cfg.key)
        case AppCodeCredential():
            return AppCode(cfg.name, cfg.code)
        case AkSkCredential():
            return Signer(cfg.name, cfg.ak, cfg.sk, cfg.security_token)
        case AppAkSkCredential():
            return Signer(cfg.name, cfg.app_key, cfg.app_secret)
        case WorkloadIdentityCredential():
            return WorkloadIdentity(cfg, session, on_refresh)
        case NoCredential():
            return NoAuth(cfg.name)
        case EcsMetadataCredential():
            return temporary_aksk.ecs_metadata(cfg, session, on_refresh)
        case PodIdentityCredential():
            return temporary_aksk.pod_identity(cfg, session, on_refresh)
        case SdkDefaultCredential():
            return temporary_aksk.sdk_default(cfg, session, on_refresh)
    raise TypeError(f"unsupported credential config {type(cfg).__name__}")


def build_credentials(
    configs: Mapping[str, CredentialConfig],
    session: aiohttp.ClientSession,
    on_refresh: RefreshListener | None = None,
    previous: Mapping[str, tuple[CredentialConfig, Credential]] | None = None,
) -> dict[str, Credential]:
    """Every configured credential, an agency's ``via`` built first and shared (one cache).

    ``previous`` (a reload: name → the config and credential serving now) gives back the same
    credential, cached token and all, for each definition that did not change. An agency is
    kept only if its ``via`` is kept too: the agency holds that very credential.
    """
    built: dict[str, Credential] = {}
    building: set[str] = set()
    before = previous or {}

    def resolve(name: str) -> Credential:
        if name not in built:
            if name in building:
                raise ValueError(f"credential {name!r}: agencies form a loop")
            building.add(name)
            cfg = configs[name]
            old = before.get(name)
            if old is not None and old[0] == cfg and _same_via(cfg):
                built[name] = old[1]
            else:
                built[name] = build_credential(cfg, session, on_refresh, resolve)
        return built[name]

    def _same_via(cfg: CredentialConfig) -> bool:
        if not isinstance(cfg, AgencyCredential):
            return True
        old_via = before.get(cfg.via)
        return old_via is not None and resolve(cfg.via) is old_via[1]

    return {name: resolve(name) for name in configs}
