"""CCE workload identity: a Kubernetes service-account token becomes a project-scoped IAM token.

``POST {iam_url}/v3.0/OS-AUTH/id-token/tokens`` with header ``X-Idp-Id: {idp_id}`` and body
``{"auth": {"id_token": {"id": <the token file>}, "scope": {"project": {...}}}}``; IAM answers 201
with the token in ``X-Subject-Token`` and ``token.expires_at`` in the body (IAM API reference,
"Obtaining a Token with an OpenID Connect ID Token", CreateTokenWithIdToken, iam_13_0605).

The file is a projected service-account token that the kubelet rewrites before it expires, so
it is read at every fetch and never cached here. Caching, refresh ahead, single flight, back-off
and the 401 replay are :class:`~gateway.credentials.iam.CachedToken`'s, as for ``iam_password``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config.model import WorkloadIdentityCredential
from gateway.credentials.cache_file import fingerprint
from gateway.credentials.iam import CachedToken, request_token
from gateway.credentials.token_cache import FetchFailed, RefreshListener, Token

ID_TOKEN_PATH = "/v3.0/OS-AUTH/id-token/tokens"
# A Kubernetes service-account token is a JWT of about 1 KiB; anything this big is not one.
MAX_ID_TOKEN_FILE = 64 * 1024


def read_id_token(path: Path) -> str:
    """The token in ``path``, stripped; FetchFailed naming the path (never the content)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ID_TOKEN_FILE + 1)
    except OSError as exc:
        raise FetchFailed(f"cannot read token_file {path} ({exc.strerror or exc})") from None
    if len(data) > MAX_ID_TOKEN_FILE:
        raise FetchFailed(f"token_file {path} is too large to hold a service-account token")
    try:
        value = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise FetchFailed(f"token_file {path} does not hold a token (not ASCII)") from None
    if not value:
        raise FetchFailed(f"token_file {path} is empty")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise FetchFailed(f"token_file {path} must hold one token (no spaces or line breaks)")
    return value


# A run of JWT characters (base64url and dots) holding PIECE characters of the id token is hidden.
_RUN = re.compile(r"[A-Za-z0-9_.-]+")
PIECE = 16


def without_id_token(text: str, id_token: str) -> str:
    """``text`` (IAM's error message, passed on) with any piece of ``id_token`` shown as ``***``.

    IAM's error texts are not documented; one that quotes the id token, even cut short by the
    160 characters kept of it, must not reach a log line, an error body or ``/readyz``.
    """

    def hide(match: re.Match[str]) -> str:
        run = match.group()
        pieces = (run[i : i + PIECE] for i in range(len(run) - PIECE + 1))
        return "***" if any(piece in id_token for piece in pieces) else run

    return _RUN.sub(hide, text)


def id_token_auth_body(cfg: WorkloadIdentityCredential, id_token: str) -> dict[str, Any]:
    """CreateTokenWithIdToken's body: the id token and the project scope."""
    project = {"id": cfg.project_id} if cfg.project_id else {"name": cfg.project}
    return {"auth": {"id_token": {"id": id_token}, "scope": {"project": project}}}


class WorkloadIdentity(CachedToken):
    """``X-Auth-Token`` from a project token that IAM issues for a service-account token."""

    def __init__(
        self,
        cfg: WorkloadIdentityCredential,
        session: aiohttp.ClientSession,
        on_refresh: RefreshListener | None = None,
    ) -> None:
        self._cfg = cfg
        self._session = session
        # No cache_file: nothing long-lived to protect from lock-outs, and a token on disk is
        # one more secret to store.
        super().__init__(cfg.name, cfg.refresh_margin, None, on_refresh)

    async def _request(self) -> Token:
        id_token = read_id_token(self._cfg.token_file)  # at every fetch: the kubelet rotates it
        try:
            return await request_token(
                self._session,
                str(self._cfg.iam_url),
                id_token_auth_body(self._cfg, id_token),
                headers={"X-Idp-Id": self._cfg.idp_id},
                path=ID_TOKEN_PATH,
                origin="IAM (workload identity)",
            )
        except FetchFailed as exc:
            redacted = without_id_token(exc.reason, id_token)
            if redacted == exc.reason:
                raise
            raise FetchFailed(redacted, rejected=exc.rejected) from None

    def _identity(self) -> str:
        cfg = self._cfg
        return fingerprint(
            "workload_identity",
            str(cfg.iam_url),
            cfg.idp_id,
            cfg.project or "",
            cfg.project_id or "",
            str(cfg.token_file.absolute()),
        )
