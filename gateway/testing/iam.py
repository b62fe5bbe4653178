"""A faithful fake of Huawei Cloud IAM's token API (Keystone-derived shapes)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web

from gateway.testing.common import Json, json_obj, json_str, stable_id
from gateway.testing.oidc import InvalidIdToken, OidcProvider

# IAM answers a wrong domain, user or password with this exact body (Keystone-style error object
# that Huawei IAM's /v3/auth/tokens inherits; the text is what IAM returns for bad credentials).
IAM_WRONG_PASSWORD: dict[str, Any] = {
    "error": {"code": 401, "title": "Unauthorized", "message": "The username or password is wrong."}
}
# Keystone's generic 401 text, used when a token or scope does not authenticate (keystone
# exception.Unauthorized); Huawei IAM is Keystone-derived.
_IAM_REQUIRES_AUTH = "The request you have made requires authentication."


def _iam_time(t: float) -> str:
    """Format like IAM's ``expires_at``: ``2020-01-04T09:05:22.701000Z`` (UTC, ms precision)."""
    moment = datetime.fromtimestamp(t, UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


def _iam_error(status: int, message: str) -> web.Response:
    """A Keystone-style IAM error: ``{"error": {"code", "title", "message"}}``."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = {"error": {"code": status, "title": title, "message": message}}
    return web.json_response(body, status=status)


def _mask_passwords(value: Any) -> Any:
    """Copy ``value`` with every non-object ``password`` value replaced by ``"***"``.

    ``identity.password`` is itself an object holding the user, so only leaf values are masked:
    the recorded request keeps the user and domain names a test may want to check.
    """
    if isinstance(value, dict):
        return {
            k: "***" if k == "password" and not isinstance(v, dict) else _mask_passwords(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask_passwords(v) for v in value]
    return value


def _v3_error(status: int, code: str, message: str) -> web.Response:
    """An error of IAM's ``/v3.0`` APIs: ``{"error_msg", "error_code"}`` (e.g. ``IAM.0004``)."""
    return web.json_response({"error_msg": message, "error_code": code}, status=status)


def _mask_id_token(body: Json) -> Json:
    """Copy a CreateTokenWithIdToken body with ``auth.id_token.id`` replaced by ``"***"``."""
    auth = json_obj(body, "auth")
    if json_obj(auth, "id_token") is None:
        return dict(body)
    assert auth is not None
    return {**body, "auth": {**auth, "id_token": {**auth["id_token"], "id": "***"}}}


class _BadRequest(Exception):
    """A malformed token request; the message goes into IAM's 400 body."""


@dataclass
class _Issued:
    expires_at: float
    scoped: bool = True  # an unscoped token "cannot be used for authentication" (iam_13_0606)


@dataclass(frozen=True)
class IdTokenRequest:
    """What one ``POST /v3.0/OS-AUTH/id-token/tokens`` carried (the fake keeps the id token)."""

    idp_id: str
    id_token: str = field(repr=False)
    scope: Json | None


class FakeIAM:
    """Huawei Cloud IAM ``POST /v3/auth/tokens``: password and assume_role (agency) tokens.

    Based on IAM API reference "Obtaining an IAM User Token (Using a Password)"
    (KeystoneCreateUserTokenByPassword, iam_30_0001) and "Obtaining an Agency Token"
    (iam_30_0003): 201, token in the ``X-Subject-Token`` header, body ``{"token": {...}}``.
    """

    def __init__(
        self,
        *,
        domain: str = "demo-account",
        user: str = "demo-user",
        password: str = "demo-password",
        projects: Mapping[str, str] | None = None,
        agencies: Mapping[str, str] | None = None,
        token_lifetime: float = 86400.0,
        providers: tuple[OidcProvider, ...] | None = None,
    ) -> None:
        self.domain = domain
        self.user = user
        self.password = password
        self.domain_id = stable_id("domain", domain)
        self.user_id = stable_id("user", f"{domain}/{user}")
        self.projects: dict[str, str] = dict(
            projects
            if projects is not None
            else {"cn-southwest-2": stable_id("project", "cn-southwest-2")}
        )
        self.agencies: dict[str, str] = dict(
            agencies if agencies is not None else {"modelarts-agency": "other-account"}
        )
        self.token_lifetime = token_lifetime
        self.providers: dict[str, OidcProvider] = {
            p.idp_id: p for p in (providers if providers is not None else (OidcProvider(),))
        }
        self.id_token_requests: list[IdTokenRequest] = []
        self.calls = 0
        self.failures: list[int] = []
        self.delay = 0.0
        # Hostile: quote the id token in the id-token endpoint's 401 message (IAM's own error
        # texts are not documented; the gateway must not pass a quoted token on)
        self.echo_id_token = False
        self.requests: list[Json] = []
        self._tokens: dict[str, _Issued] = {}
        self.app = web.Application()
        self.app.router.add_post("/v3/auth/tokens", self._tokens_handler)
        self.app.router.add_post("/v3.0/OS-AUTH/id-token/tokens", self._id_token_handler)

    @property
    def provider(self) -> OidcProvider:
        """The first identity provider (the cluster most tests use)."""
        return next(iter(self.providers.values()))

    def is_valid(self, token: str) -> bool:
        """True if this IAM issued ``token`` with a scope, it was not revoked or expired."""
        issued = self._tokens.get(token)
        return issued is not None and issued.scoped and time.time() < issued.expires_at

    def revoke_all(self) -> None:
        """Invalidate every issued token, as a password change does before ``expires_at``."""
        self._tokens.clear()

    async def _tokens_handler(self, request: web.Request) -> web.Response:
        self.calls += 1
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        # Keep requests aligned with calls: an unparsable body is recorded as {}.
        self.requests.append(_mask_passwords(body) if isinstance(body, dict) else {})
        failure = self.failures.pop(0) if self.failures else None
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if failure == 401:
            return web.json_response(IAM_WRONG_PASSWORD, status=401)
        if failure is not None:
            return _iam_error(failure, "The service is temporarily unavailable.")
        if not isinstance(body, dict):
            return _iam_error(400, "The request body is not a valid JSON object.")
        try:
            return self._issue(request, body)
        except _BadRequest as exc:
            return _iam_error(400, str(exc))

    def _issue(self, request: web.Request, body: Json) -> web.Response:
        auth = json_obj(body, "auth")
        identity = json_obj(auth, "identity")
        if identity is None:
            raise _BadRequest("Invalid input for field 'auth.identity'.")
        project = self._scoped_project(auth)
        methods = identity.get("methods")
        if methods == ["password"]:
            return self._password_token(request, identity, project)
        if methods == ["assume_role"]:
            return self._agency_token(request, identity, project)
        raise _BadRequest("Invalid input for field 'auth.identity.methods'.")

    def _scoped_project(self, auth: Json | None) -> tuple[str, str] | None:
        """The (name, id) of ``auth.scope.project``; None if it names no known project."""
        scope = json_obj(auth, "scope")
        project = json_obj(scope, "project")
        name, pid = json_str(project, "name"), json_str(project, "id")
        if name is None and pid is None:
            raise _BadRequest("Invalid input for field 'auth.scope.project': id or name required.")
        for known_name, known_id in self.projects.items():
            if name in (None, known_name) and pid in (None, known_id):
                return known_name, known_id
        return None

    def _password_token(
        self, request: web.Request, identity: Json, project: tuple[str, str] | None
    ) -> web.Response:
        user = json_obj(json_obj(identity, "password"), "user")
        domain = json_obj(user, "domain")
        name, password = json_str(user, "name"), json_str(user, "password")
        domain_name, domain_id = json_str(domain, "name"), json_str(domain, "id")
        if name is None or password is None or (domain_name is None and domain_id is None):
            raise _BadRequest(
                "Invalid input for field 'auth.identity.password.user': "
                "name, password and domain.name are required."
            )
        domain_ok = domain_name in (None, self.domain) and domain_id in (None, self.domain_id)
        # Compare the password in constant time even in a fake: the habit is the point.
        password_ok = secrets.compare_digest(password.encode(), self.password.encode())
        if not (domain_ok and name == self.user and password_ok):
            return web.json_response(IAM_WRONG_PASSWORD, status=401)
        if project is None:
            # Keystone answers an unknown scope target with its generic 401 (Unauthorized).
            return _iam_error(401, _IAM_REQUIRES_AUTH)
        user_obj = self._user_obj(self.user_id, self.user, self.domain_id, self.domain)
        return self._token_response(request, ["password"], project, user_obj, self.token_lifetime)

    def _agency_token(
        self, request: web.Request, identity: Json, project: tuple[str, str] | None
    ) -> web.Response:
        role = json_obj(identity, "assume_role")
        agency = json_str(role, "agency_name")
        target_name, target_id = json_str(role, "domain_name"), json_str(role, "domain_id")
        duration = role.get("duration_seconds") if role is not None else None
        if agency is None or (target_name is None and target_id is None):
            raise _BadRequest(
                "Invalid input for field 'auth.identity.assume_role': "
                "agency_name and domain_name or domain_id are required."
            )
        if duration is not None and (
            not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0
        ):
            raise _BadRequest(
                "Invalid input for field 'auth.identity.assume_role.duration_seconds'."
            )
        # "X-Auth-Token: Token with Agent Operator permissions of an IAM user created by
        # delegated party B" (iam_30_0003): the caller's own token authorises the request.
        caller = request.headers.get("X-Auth-Token", "")
        agency_domain = self.agencies.get(agency)
        target_ok = agency_domain is not None and (
            target_name in (None, agency_domain)
            and target_id in (None, stable_id("domain", agency_domain))
        )
        if not self.is_valid(caller) or not target_ok or project is None:
            return _iam_error(401, _IAM_REQUIRES_AUTH)
        assert agency_domain is not None  # narrowed by target_ok
        lifetime = self.token_lifetime if duration is None else min(duration, self.token_lifetime)
        agency_domain_id = stable_id("domain", agency_domain)
        user_obj = self._user_obj(
            stable_id("agency", f"{agency_domain}/{agency}"),
            f"{agency_domain}/{agency}",
            agency_domain_id,
            agency_domain,
        )
        user_obj["assumed_by"] = {
            "user": self._user_obj(self.user_id, self.user, self.domain_id, self.domain)
        }
        return self._token_response(request, ["assume_role"], project, user_obj, lifetime)

    async def _id_token_handler(self, request: web.Request) -> web.Response:
        """CreateTokenWithIdToken (iam_13_0605): ``X-Idp-Id`` names an OpenID Connect identity
        provider; ``auth.id_token.id`` is the IdP's ID token; ``auth.scope`` is optional (no
        scope: an unscoped token). 201, the token in ``X-Subject-Token``, ``{"token": {...}}``
        with ``methods: ["mapped"]`` and the federated user (``OS-FEDERATION``)."""
        self.calls += 1
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        auth = json_obj(body, "auth")
        id_token = json_str(json_obj(auth, "id_token"), "id")
        scope = json_obj(auth, "scope")
        idp_id = request.headers.get("X-Idp-Id", "")
        self.requests.append(_mask_id_token(body) if isinstance(body, dict) else {})
        self.id_token_requests.append(IdTokenRequest(idp_id, id_token or "", scope))
        failure = self.failures.pop(0) if self.failures else None
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if failure is not None:
            return _v3_error(failure, "IAM.0006", "The service is temporarily unavailable.")
        if not idp_id:
            return _v3_error(400, "IAM.0007", "Request header 'X-Idp-Id' is required.")
        if id_token is None:
            return _v3_error(400, "IAM.0007", "Invalid input for field 'auth.id_token.id'.")
        provider = self.providers.get(idp_id)
        if provider is None:
            return _v3_error(404, "IAM.0004", f"Could not find identity provider: {idp_id}.")
        try:
            claims = provider.verify(id_token)
        except InvalidIdToken as exc:
            quoted = f" (id_token {id_token})" if self.echo_id_token else ""
            return _v3_error(401, "IAM.0002", f"Authentication failed{quoted}: {exc}.")
        project: tuple[str, str] | None = None
        if scope is not None and json_obj(scope, "project") is not None:
            try:
                project = self._scoped_project(auth)
            except _BadRequest as exc:
                return _v3_error(400, "IAM.0007", str(exc))
            if project is None:
                return _v3_error(401, "IAM.0002", _IAM_REQUIRES_AUTH)
        user_obj = self._user_obj(
            stable_id("federated", f"{idp_id}/{claims['sub']}"),
            "FederationUser",
            self.domain_id,
            self.domain,
        )
        user_obj["OS-FEDERATION"] = {
            "identity_provider": {"id": idp_id},
            "protocol": {"id": "oidc"},
            "groups": [{"id": stable_id("group", provider.group), "name": provider.group}],
        }
        return self._token_response(request, ["mapped"], project, user_obj, self.token_lifetime)

    @staticmethod
    def _user_obj(user_id: str, name: str, domain_id: str, domain_name: str) -> Json:
        return {
            "domain": {"id": domain_id, "name": domain_name},
            "id": user_id,
            "name": name,
            "password_expires_at": "",
        }

    def _token_response(
        self,
        request: web.Request,
        methods: list[str],
        project: tuple[str, str] | None,
        user_obj: Json,
        lifetime: float,
    ) -> web.Response:
        now = time.time()
        # Real tokens are long PKI blobs starting "MII" (doc example "MIIatAYJKoZIhvcNAQcCoIIa...").
        token = "MIIatAYJKoZIhvcNAQcCoII" + secrets.token_urlsafe(1536)
        self._tokens[token] = _Issued(expires_at=now + lifetime, scoped=project is not None)
        assumed_by = user_obj.pop("assumed_by", None)
        domain = user_obj["domain"]
        token_body: Json = {
            "expires_at": _iam_time(now + lifetime),
            "issued_at": _iam_time(now),
            "methods": methods,
            "user": user_obj,
        }
        if project is not None:  # an unscoped token has no project, roles or catalog
            project_name, project_id = project
            token_body["catalog"] = (
                [] if "nocatalog" in request.query else self._catalog(project_name)
            )
            token_body["project"] = {"domain": dict(domain), "id": project_id, "name": project_name}
            token_body["roles"] = [{"id": "0", "name": "op_auth"}, {"id": "1", "name": "te_admin"}]
        if assumed_by is not None:
            token_body["assumed_by"] = assumed_by
        return web.json_response(
            {"token": token_body}, status=201, headers={"X-Subject-Token": token}
        )

    @staticmethod
    def _catalog(region: str) -> list[Json]:
        """A one-service catalog shaped like IAM's (type, id, name, endpoints[...])."""
        return [
            {
                "endpoints": [
                    {
                        "id": stable_id("endpoint", f"modelarts/{region}"),
                        "interface": "public",
                        "region": region,
                        "region_id": region,
                        "url": f"https://modelarts.{region}.myhuaweicloud.com",
                    }
                ],
                "id": stable_id("service", "modelarts"),
                "name": "modelarts",
                "type": "modelarts",
            }
        ]
