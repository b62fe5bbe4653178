"""``modelarts-gateway token``: fetch a token with a configured credential and say what it is.

Debugs credentials without an app: prints the project the token is scoped to, when it expires
and where it came from (IAM, the cache file, ...), and the token itself only with ``--show``.
For temporary AK/SK sources (ecs_metadata, pod_identity, sdk_default) it prints the source and
the expiry, never a key, not even with ``--show``.
Exit codes follow the CLI: 0 every token fetched, 1 a fetch failed (with IAM's safe reason),
2 the credential is unknown or yields no token.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import aiohttp

from gateway.config.model import (
    AgencyCredential,
    CredentialConfig,
    EcsMetadataCredential,
    IamPasswordCredential,
    PodIdentityCredential,
    SdkDefaultCredential,
    Settings,
    StaticTokenCredential,
    TokenFileCredential,
    WorkloadIdentityCredential,
)
from gateway.credentials import TokenSource, build_credentials
from gateway.credentials.key_services import TemporaryKeys
from gateway.credentials.temporary_aksk import TemporaryAkSk
from gateway.credentials.token_cache import Token
from gateway.errors import CredentialUnavailable

TOKEN_CONFIGS = (
    IamPasswordCredential,
    AgencyCredential,
    StaticTokenCredential,
    TokenFileCredential,
    WorkloadIdentityCredential,
)
# Temporary AK/SK sources: the command shows where the keys came from and when they expire.
KEY_CONFIGS = (EcsMetadataCredential, PodIdentityCredential, SdkDefaultCredential)
KINDS = "iam_password, agency, token, workload_identity, ecs_metadata, pod_identity and sdk_default"


def token_credentials(credentials: Mapping[str, CredentialConfig]) -> list[str]:
    """Names of the credentials that yield an IAM token or temporary AK/SK, in config order."""
    kinds = (*TOKEN_CONFIGS, *KEY_CONFIGS)
    return [name for name, cfg in credentials.items() if isinstance(cfg, kinds)]


def select(settings: Settings, credential: str | None) -> tuple[list[str], str | None]:
    """The credentials to fetch, or a problem (exit 2)."""
    usable = token_credentials(settings.credentials)
    if credential is None:
        if not usable:
            return [], f"no credential in this config yields a token or temporary AK/SK ({KINDS})"
        return usable, None
    if credential not in settings.credentials:
        known = ", ".join(settings.credentials) or "none defined"
        return [], f"no credential named {credential!r} (known: {known})"
    if credential not in usable:
        return [], (
            f"credential {credential!r} does not use IAM tokens; the token command works with "
            f"{KINDS} credentials ({', '.join(usable) or 'none here'})"
        )
    return [credential], None


def describe(name: str, token: Token, now: float | None = None) -> str:
    """One line: project, expiry (absolute and remaining) and origin; never the token."""
    now = time.time() if now is None else now
    project = token.project or "-"
    if token.project_id:
        project += f" (id {token.project_id})"
    if math.isinf(token.expires_at):
        expiry = "expiry unknown (the token is not issued by the gateway)"
    else:
        moment = datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        left = int(token.expires_at - now)
        expiry = f"expires {moment} (in {left // 3600} h {left % 3600 // 60:02d} min)"
    return f"{name}: project {project}, {expiry}, from {token.origin or '-'}"


def describe_keys(name: str, keys: TemporaryKeys, now: float | None = None) -> str:
    """One line: where temporary AK/SK came from and when they expire; never a key."""
    now = time.time() if now is None else now
    if math.isinf(keys.expires_at):
        expiry = "no expiry (keys managed outside the gateway)"
    else:
        moment = datetime.fromtimestamp(keys.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        left = int(keys.expires_at - now)
        expiry = f"expires {moment} (in {left // 3600} h {left % 3600 // 60:02d} min)"
    token = "with" if keys.security_token is not None else "without"
    return f"{name}: AK/SK {token} security token, {expiry}, from {keys.origin}"


async def fetch_tokens(settings: Settings, names: Sequence[str], show: bool) -> int:
    """Fetch and print each named credential's token; 0, or 1 if any fetch failed."""
    status = 0
    async with aiohttp.ClientSession() as session:
        credentials = build_credentials(settings.credentials, session)
        try:
            for name in names:
                credential = credentials[name]
                if isinstance(credential, TemporaryAkSk):
                    try:
                        keys = await credential.keys()
                    except CredentialUnavailable as exc:
                        print(f"modelarts-gateway: {exc.message}", file=sys.stderr)
                        status = 1
                        continue
                    print(describe_keys(name, keys), flush=True)
                    if show:
                        print(f"modelarts-gateway: {name}: --show prints no AK/SK", file=sys.stderr)
                    continue
                assert isinstance(credential, TokenSource)  # select() kept only those
                try:
                    token = await credential.token()
                except CredentialUnavailable as exc:
                    print(f"modelarts-gateway: {exc.message}", file=sys.stderr)
                    status = 1
                    continue
                print(describe(name, token), flush=True)
                if show:
                    print(token.value, flush=True)
        finally:
            for credential in credentials.values():
                await credential.close()
    return status
