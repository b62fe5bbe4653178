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
    IamPasswordCredential,
    NoCredential,
    StaticTokenCredential,
    TokenFileCredential,
    WorkloadIdentityCredential,
)
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
    raise TypeError(f"unsupported credential config {type(cfg).__name__}")


def build_credentials(
    configs: Mapping[str, CredentialConfig],
    session: aiohttp.ClientSession,
    on_refresh: RefreshListener | None = None,
) -> dict[str, Credential]:
    """Every configured credential, an agency's ``via`` built first and shared (one cache)."""
    built: dict[str, Credential] = {}
    building: set[str] = set()

    def resolve(name: str) -> Credential:
        if name not in built:
            if name in building:
                raise ValueError(f"credential {name!r}: agencies form a loop")
            building.add(name)
            built[name] = build_credential(configs[name], session, on_refresh, resolve)
        return built[name]

    return {name: resolve(name) for name in configs}
