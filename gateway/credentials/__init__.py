"""Credential sources, chosen by the config's ``type``."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from gateway.config import (
    CredentialConfig,
    IamPasswordCredential,
    NoCredential,
    StaticTokenCredential,
)
from gateway.credentials.base import Credential, Outgoing
from gateway.credentials.iam import IamPassword
from gateway.credentials.static import NoAuth, StaticToken
from gateway.credentials.token_cache import RefreshListener

__all__ = ["Credential", "Outgoing", "build_credentials"]


def build_credential(
    cfg: CredentialConfig,
    session: aiohttp.ClientSession,
    on_refresh: RefreshListener | None,
) -> Credential:
    match cfg:
        case IamPasswordCredential():
            return IamPassword(cfg, session, on_refresh)
        case StaticTokenCredential():
            return StaticToken(cfg.name, cfg.token)
        case NoCredential():
            return NoAuth(cfg.name)
    raise TypeError(f"unsupported credential config {type(cfg).__name__}")


def build_credentials(
    configs: Mapping[str, CredentialConfig],
    session: aiohttp.ClientSession,
    on_refresh: RefreshListener | None = None,
) -> dict[str, Credential]:
    return {name: build_credential(cfg, session, on_refresh) for name, cfg in configs.items()}
