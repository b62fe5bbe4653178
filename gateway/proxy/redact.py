"""No secret the gateway holds in text it shows a client (a re-shaped upstream error).

APIG's ``error_msg`` may quote the request's headers, the gateway's token among them. Every
secret value is cut out whole, and so is any long token-like run of characters that is part
of one (an upstream that quotes only the first kilobyte of a token still quotes a secret).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from gateway.config.model import CredentialConfig, Secret

MASK = "***"
# Runs of token characters; "=" and "." split them, so "token=ABC" yields "ABC".
_RUN = re.compile(r"[A-Za-z0-9+/_\-]{12,}")
# Headers a credential sets on an outgoing request.
CREDENTIAL_HEADERS = ("Authorization", "X-Auth-Token", "X-Apig-AppCode", "X-Security-Token")


def config_secrets(credentials: Mapping[str, CredentialConfig]) -> tuple[str, ...]:
    """Every secret value in the credentials' config (passwords, keys, tokens, SKs)."""
    found: list[str] = []
    for config in credentials.values():
        for value in vars(config).values():
            if isinstance(value, Secret) and value.reveal():
                found.append(value.reveal())
    return tuple(found)


def sent_secrets(headers: CIMultiDict[str]) -> list[str]:
    """The credential values on an outgoing request (the live token, key or signature)."""
    found: list[str] = []
    for name in CREDENTIAL_HEADERS:
        for value in headers.getall(name, ()):
            found.append(value)
            _, _, rest = value.partition(" ")
            if rest:
                found.append(rest.strip())
                found.extend(p.strip() for p in rest.split(",") if p.strip())
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` without any secret, whole or in part (a run of 12 or more token characters)."""
    held = [s for s in secrets if s]
    if not held:
        return text
    for secret in sorted(held, key=len, reverse=True):
        text = text.replace(secret, MASK)

    def part_of_secret(match: re.Match[str]) -> str:
        run = match.group(0)
        return MASK if any(run in s for s in held) else run

    return _RUN.sub(part_of_secret, text)
