"""What every credential source looks like to the upstream client.

``apply`` gets the whole outgoing request rather than returning a token, so sources that sign the
method, path, headers and body fit the same slot as sources that add one header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from multidict import CIMultiDict
from yarl import URL

from gateway.credentials.token_cache import Token


@dataclass(slots=True)
class Outgoing:
    """A request about to go upstream; credentials are applied to it last."""

    method: str
    url: URL
    # not in repr: after apply() the headers hold the credential, and bodies are the client's
    headers: CIMultiDict[str] = field(repr=False)
    body: bytes = field(repr=False)
    # What apply() used (e.g. the token), so invalidate() drops exactly that one.
    credential_state: object = field(default=None, repr=False)


class Credential(Protocol):
    name: str

    async def apply(self, outgoing: Outgoing) -> None:
        """Add authentication to ``outgoing``; raise CredentialUnavailable when it cannot."""

    def invalidate(self, outgoing: Outgoing) -> bool:
        """The upstream refused what ``apply`` added: forget it; True if a retry can help."""

    def ready(self) -> str | None:
        """None when a request could be authenticated now, else a reason (no secrets)."""

    async def start(self) -> None:
        """Begin background work (e.g. fetch a first token)."""

    async def close(self) -> None:
        """Stop background work."""


@runtime_checkable
class TokenSource(Protocol):
    """A credential that yields IAM tokens: what an agency's ``via`` and ``token`` command use."""

    name: str

    async def token(self) -> Token:
        """A token usable now; raise CredentialUnavailable when there is none."""

    def invalidate_token(self, value: str) -> None:
        """Forget ``value``: it was refused before its expiry."""

    def fingerprint(self) -> str:
        """A stable digest of the identity behind the tokens (keys on-disk caches)."""


class Fixed:
    """For credentials with nothing to fetch, refresh or stop: a refusal is final."""

    def invalidate(self, outgoing: Outgoing) -> bool:
        return False

    def ready(self) -> str | None:
        return None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
