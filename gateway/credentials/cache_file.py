"""An on-disk token cache (``cache_file:``), so a restart does not call IAM again.

The file holds one token and a fingerprint of the identity that obtained it. It is trusted only
when every check passes; otherwise it is ignored with a warning (never an error: IAM is still
there) and overwritten after the next fetch:

- a regular file, not a symbolic link, owned by this user, readable by nobody else (0600);
- valid JSON of this format's version, at most 64 KiB;
- its fingerprint equals this credential's (same IAM, account, user, project, password):
  a file left by another identity is foreign;
- its token is not expired by the wall clock now.

Writes are atomic: a new file is created next to it with ``O_CREAT | O_EXCL`` and mode 0600 (no
moment where it is readable by others, whatever the umask), synced, then renamed over the old one.
Log lines name the path and the reason, never the token.

Several processes may share one file (``--workers``, the systemd template unit): a fetch then
happens under an exclusive ``flock`` on ``.<name>.lock`` next to it, and whoever gets the lock
first reads the file again, so one process calls IAM and the others adopt what it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there each process fetches its own token
    fcntl = None  # type: ignore[assignment]

from gateway.credentials.token_cache import EXPIRY_SAFETY, Token

log = logging.getLogger("gateway.credentials")

FORMAT_VERSION = 1
MAX_SIZE = 64 * 1024
# PBKDF2 iterations for the password's share of the fingerprint: the file must not make an offline
# guess of the password cheap (a plain SHA-256 of a weak password is brute-forced in seconds).
PASSWORD_HASH_ITERATIONS = 200_000
# How long a fetch waits for another process's fetch under the lock: longer than one IAM call
# (IAM_TIMEOUT, 30 s) so a slow IAM is waited for; after it the fetch goes ahead unlocked.
LOCK_WAIT = 45.0
# A held lock is polled (flock has no awaitable form; a blocked thread could not be cancelled).
LOCK_POLL = 0.02


def fingerprint(*parts: str) -> str:
    """Hex SHA-256 over the parts (JSON-encoded, so no two part lists collide)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def password_hash(password: str, salt: str) -> str:
    """A slow, salted hash of a password: fit to go into a fingerprint stored on disk."""
    digest = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), f"modelarts-gateway|{salt}".encode(), PASSWORD_HASH_ITERATIONS
    )
    return digest.hex()


class TokenCacheFile:
    """Load and save one credential's token at ``path``, keyed by ``identity()``.

    ``identity`` returns the credential's fingerprint (see :func:`fingerprint`).
    """

    def __init__(
        self,
        name: str,
        path: Path,
        identity: Callable[[], str],
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.path = path
        self.fingerprint = identity
        self._now = wall_clock

    def _ignore(self, reason: str) -> None:
        log.warning("credential %r: ignoring cache_file %s: %s", self.name, self.path, reason)

    def load(self) -> Token | None:
        """The cached token if the file passes every check, else None (with a warning)."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            log.info("credential %r: no cache_file at %s yet", self.name, self.path)
            return None
        except OSError as exc:
            self._ignore(f"cannot open it ({exc.strerror or type(exc).__name__})")
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            problem = _unsafe(info)
            if problem is not None:
                self._ignore(problem)
                return None
            data = f.read(MAX_SIZE + 1)
        if len(data) > MAX_SIZE:
            self._ignore("it is too large to be a token cache")
            return None
        try:
            entry = json.loads(data)
            version = entry["version"]
            stored_fingerprint = entry["fingerprint"]
            token = Token(
                value=entry["token"],
                expires_at=float(entry["expires_at"]),
                project=str(entry.get("project", "")),
                project_id=str(entry.get("project_id", "")),
                origin="cache_file",
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._ignore("it is not a token cache written by this program (corrupt or truncated)")
            return None
        if version != FORMAT_VERSION or not isinstance(stored_fingerprint, str):
            self._ignore(f"unknown format version {version!r}")
            return None
        if not isinstance(token.value, str) or not token.value:
            self._ignore("it holds no token")
            return None
        if not hmac.compare_digest(stored_fingerprint.encode(), self.fingerprint().encode()):
            self._ignore(
                "it was written for another identity (IAM URL, account, user, project or "
                "password differ)"
            )
            return None
        remaining = token.expires_at - self._now()
        if remaining <= EXPIRY_SAFETY:
            self._ignore("its token has expired")
            return None
        log.info(
            "credential %r: using the token from cache_file %s, expires in %.0f s",
            self.name,
            self.path,
            remaining,
        )
        return token

    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        """Hold the file's fetch lock (``flock`` on ``.<name>.lock``) for the block.

        Without it (cannot be opened, or held by another process past ``LOCK_WAIT``) the block
        runs anyway, with a warning: a second IAM call is better than no token.
        """
        fd = self._open_lock()
        try:
            if fd is not None:
                await self._acquire(fd)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock

    def _open_lock(self) -> int | None:
        if fcntl is None:
            return None
        path = self.path.with_name(f".{self.path.name}.lock")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(path, flags, 0o600)
        except OSError as exc:
            log.warning(
                "credential %r: cannot open the lock %s (%s): fetching without it",
                self.name,
                path,
                exc.strerror or type(exc).__name__,
            )
            return None

    async def _acquire(self, fd: int) -> None:
        assert fcntl is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if not waited:
                waited = True
                log.debug("credential %r: another process is fetching a token", self.name)
            if loop.time() >= deadline:
                log.warning(
                    "credential %r: the lock of cache_file %s is held over %g s: fetching anyway",
                    self.name,
                    self.path,
                    LOCK_WAIT,
                )
                return
            await asyncio.sleep(LOCK_POLL)

    def save(self, token: Token) -> None:
        """Replace the file atomically with ``token``; a failure is logged, never raised."""
        entry = {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "token": token.value,
            "expires_at": token.expires_at,
            "project": token.project,
            "project_id": token.project_id,
        }
        data = json.dumps(entry).encode()
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    if hasattr(os, "fchmod"):
                        os.fchmod(f.fileno(), 0o600)  # exact, whatever the umask
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning(
                "credential %r: cannot write cache_file %s (%s)",
                self.name,
                self.path,
                exc.strerror or type(exc).__name__,
            )
            return
        log.debug("credential %r: token saved to cache_file %s", self.name, self.path)


def _unsafe(info: os.stat_result) -> str | None:
    """Why a file with this status must not be trusted, or None."""
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    getuid = getattr(os, "getuid", None)
    if getuid is not None and info.st_uid != getuid():
        return f"it is owned by uid {info.st_uid}, not by this user"
    if info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        return f"its mode {mode:04o} lets other users read or change it (expected 0600)"
    return None
