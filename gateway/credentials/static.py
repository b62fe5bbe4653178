"""Credentials that add one header: a fixed token, a token file, an API key, an AppCode, nothing."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from gateway.config.model import Secret
from gateway.credentials.base import Fixed, Outgoing
from gateway.credentials.cache_file import fingerprint
from gateway.credentials.token_cache import Token
from gateway.errors import CredentialUnavailable

log = logging.getLogger("gateway.credentials")

# A token file bigger than this is not a token (IAM tokens are a few KiB).
MAX_TOKEN_FILE = 64 * 1024


class StaticHeader(Fixed):
    """Sends one configured header; a refusal cannot be cured by retrying the same value."""

    def __init__(self, name: str, header: str, value: Secret, prefix: str = "") -> None:
        self.name = name
        self._header = header
        self._value = value
        self._prefix = prefix

    async def apply(self, outgoing: Outgoing) -> None:
        outgoing.headers[self._header] = self._prefix + self._value.reveal()


class ApiKey(StaticHeader):
    """``Authorization: Bearer <key>``: API-key online services and ModelArts MaaS."""

    def __init__(self, name: str, key: Secret) -> None:
        super().__init__(name, "Authorization", key, prefix="Bearer ")


class AppCode(StaticHeader):
    """``X-Apig-AppCode: <code>``: APIG app authentication, simple (AppCode) mode."""

    def __init__(self, name: str, code: Secret) -> None:
        super().__init__(name, "X-Apig-AppCode", code)


class StaticToken(StaticHeader):
    """Sends a configured token as ``X-Auth-Token``; also usable as an agency's ``via``."""

    def __init__(self, name: str, token: Secret) -> None:
        super().__init__(name, "X-Auth-Token", token)
        self._token = token

    async def token(self) -> Token:
        return Token(self._token.reveal(), expires_at=math.inf, origin="config")

    def invalidate_token(self, value: str) -> None:
        pass

    def fingerprint(self) -> str:
        return fingerprint("token", self._token.reveal())


class TokenFile:
    """``X-Auth-Token`` from a file another tool keeps up to date.

    The file is re-read when its identity, size or modification time changes (one ``stat`` per
    request; an atomic rename by the writing tool is seen at once). While the file is missing,
    empty or malformed, the last good token keeps being sent and a warning is logged once.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self._path = path
        self._seen: tuple[int, int, int, int] | None = None
        self._value = ""
        self._problem: str | None = None

    def _current(self) -> str:
        try:
            info = os.stat(self._path)
        except OSError as exc:
            return self._fail(None, f"cannot read token_file {self._path} ({exc.strerror})")
        seen = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if seen == self._seen:
            if self._value:
                return self._value
            raise CredentialUnavailable(f"credential {self.name!r}: {self._problem}")
        try:
            with open(self._path, "rb") as f:
                data = f.read(MAX_TOKEN_FILE + 1)
        except OSError as exc:
            return self._fail(seen, f"cannot read token_file {self._path} ({exc.strerror})")
        if len(data) > MAX_TOKEN_FILE:
            return self._fail(seen, f"token_file {self._path} is too large to hold a token")
        try:
            value = data.decode("ascii").strip()
        except UnicodeDecodeError:
            value = "\n"  # not a token: rejected below
        if not value:
            return self._fail(seen, f"token_file {self._path} is empty")
        if not value.isprintable() or any(c.isspace() for c in value):
            return self._fail(
                seen, f"token_file {self._path} must hold one token (no spaces or line breaks)"
            )
        if self._value:
            log.info("credential %r: token_file changed, using the new token", self.name)
        self._seen, self._value, self._problem = seen, value, None
        return value

    def _fail(self, seen: tuple[int, int, int, int] | None, problem: str) -> str:
        """Keep serving the last good token (a writer may be mid-update); else fail."""
        if problem != self._problem:
            log.warning("credential %r: %s", self.name, problem)
        self._seen, self._problem = seen, problem
        if self._value:
            return self._value
        raise CredentialUnavailable(f"credential {self.name!r}: {problem}")

    async def token(self) -> Token:
        return Token(self._current(), expires_at=math.inf, origin="token_file")

    def invalidate_token(self, value: str) -> None:
        pass

    def fingerprint(self) -> str:
        return fingerprint("token_file", str(self._path.absolute()))

    async def apply(self, outgoing: Outgoing) -> None:
        value = self._current()
        outgoing.headers["X-Auth-Token"] = value
        outgoing.credential_state = value

    def invalidate(self, outgoing: Outgoing) -> bool:
        """Refused: worth a replay only if the file now holds another token."""
        try:
            return self._current() != outgoing.credential_state
        except CredentialUnavailable:
            return False

    def ready(self) -> str | None:
        try:
            self._current()
        except CredentialUnavailable as exc:
            return exc.message
        return None

    async def start(self) -> None:
        self.ready()  # logs a warning now if the file is missing

    async def close(self) -> None:
        pass


class NoAuth(Fixed):
    """For services deployed without authentication (and for local testing)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def apply(self, outgoing: Outgoing) -> None:
        pass
