"""Faithful fakes of Huawei Cloud IAM and a ModelArts LLM online service, as aiohttp apps.

The tests and the ``demo`` command run the gateway against these over real loopback sockets, so
the fakes copy the wire shapes a real deployment produces (status codes, error bodies, headers,
SSE framing) and let a test script the upstream's misbehaviour: slow headers, pauses, stalls,
resets, split events, scripted failures, revoked tokens. Every shape cites what it is based on.

All state lives on the fake instances (never at module level), so two clouds in one process do
not interfere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = [
    "SSE_CONTENT_TYPE",
    "FakeCloud",
    "FakeIAM",
    "FakeModelArts",
    "RecordedRequest",
    "Script",
    "serve_on_loopback",
    "start_fake_cloud",
]

# ModelArts "Accessing a Real-Time Service Using Server-Sent Events": "In normal cases, the value
# of Content-Type in the response header is text/event-stream;charset=UTF-8" (no space).
SSE_CONTENT_TYPE = "text/event-stream;charset=UTF-8"

# ModelArts real-time service constraints: "The size of a request body cannot exceed 12 MB";
# API Gateway answers APIG.0201 "Request entity too large." with 413 (APIG error code table).
MODELARTS_MAX_BODY = 12 * 1024 * 1024

# IAM answers a wrong domain, user or password with this exact body (Keystone-style error object
# that Huawei IAM's /v3/auth/tokens inherits; the text is what IAM returns for bad credentials).
IAM_WRONG_PASSWORD: dict[str, Any] = {
    "error": {"code": 401, "title": "Unauthorized", "message": "The username or password is wrong."}
}
# Keystone's generic 401 text, used when a token or scope does not authenticate (keystone
# exception.Unauthorized); Huawei IAM is Keystone-derived.
_IAM_REQUIRES_AUTH = "The request you have made requires authentication."

Json = dict[str, Any]


async def serve_on_loopback(
    app: web.Application, port: int = 0, *, shutdown_timeout: float = 0.1
) -> tuple[web.AppRunner, str]:
    """Start ``app`` on 127.0.0.1 (port 0 lets the OS choose); return (runner, base URL).

    The caller owns the runner and must ``await runner.cleanup()``. ``handler_cancellation`` is on
    so a handler stalled mid-stream is cancelled when its client goes away, like a real server
    noticing a closed socket. aiohttp's shutdown waits ``shutdown_timeout`` twice for handlers
    still running (a stalled stream never finishes), so the default is short to keep teardown fast.
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, f"http://127.0.0.1:{bound_port}"


def _stable_id(kind: str, name: str) -> str:
    """A 32-hex id derived from a name: looks like a Huawei id and is stable across runs."""
    return hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()[:32]


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


def _obj(parent: Any, key: str) -> Json | None:
    """``parent[key]`` if parent is a dict and that value is a dict, else None."""
    if isinstance(parent, dict):
        child = parent.get(key)
        if isinstance(child, dict):
            return child
    return None


def _str(parent: Json | None, key: str) -> str | None:
    """``parent[key]`` if it is a non-empty string, else None."""
    if parent is None:
        return None
    value = parent.get(key)
    return value if isinstance(value, str) and value else None


class _BadRequest(Exception):
    """A malformed token request; the message goes into IAM's 400 body."""


@dataclass
class _Issued:
    expires_at: float


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
    ) -> None:
        self.domain = domain
        self.user = user
        self.password = password
        self.domain_id = _stable_id("domain", domain)
        self.user_id = _stable_id("user", f"{domain}/{user}")
        self.projects: dict[str, str] = dict(
            projects
            if projects is not None
            else {"cn-southwest-2": _stable_id("project", "cn-southwest-2")}
        )
        self.agencies: dict[str, str] = dict(
            agencies if agencies is not None else {"modelarts-agency": "other-account"}
        )
        self.token_lifetime = token_lifetime
        self.calls = 0
        self.failures: list[int] = []
        self.delay = 0.0
        self.requests: list[Json] = []
        self._tokens: dict[str, _Issued] = {}
        self.app = web.Application()
        self.app.router.add_post("/v3/auth/tokens", self._tokens_handler)

    def is_valid(self, token: str) -> bool:
        """True if this IAM issued ``token``, it was not revoked, and it has not expired."""
        issued = self._tokens.get(token)
        return issued is not None and time.time() < issued.expires_at

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
        auth = _obj(body, "auth")
        identity = _obj(auth, "identity")
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
        scope = _obj(auth, "scope")
        project = _obj(scope, "project")
        name, pid = _str(project, "name"), _str(project, "id")
        if name is None and pid is None:
            raise _BadRequest("Invalid input for field 'auth.scope.project': id or name required.")
        for known_name, known_id in self.projects.items():
            if name in (None, known_name) and pid in (None, known_id):
                return known_name, known_id
        return None

    def _password_token(
        self, request: web.Request, identity: Json, project: tuple[str, str] | None
    ) -> web.Response:
        user = _obj(_obj(identity, "password"), "user")
        domain = _obj(user, "domain")
        name, password = _str(user, "name"), _str(user, "password")
        domain_name, domain_id = _str(domain, "name"), _str(domain, "id")
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
        role = _obj(identity, "assume_role")
        agency = _str(role, "agency_name")
        target_name, target_id = _str(role, "domain_name"), _str(role, "domain_id")
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
            and target_id in (None, _stable_id("domain", agency_domain))
        )
        if not self.is_valid(caller) or not target_ok or project is None:
            return _iam_error(401, _IAM_REQUIRES_AUTH)
        assert agency_domain is not None  # narrowed by target_ok
        lifetime = self.token_lifetime if duration is None else min(duration, self.token_lifetime)
        agency_domain_id = _stable_id("domain", agency_domain)
        user_obj = self._user_obj(
            _stable_id("agency", f"{agency_domain}/{agency}"),
            f"{agency_domain}/{agency}",
            agency_domain_id,
            agency_domain,
        )
        user_obj["assumed_by"] = {
            "user": self._user_obj(self.user_id, self.user, self.domain_id, self.domain)
        }
        return self._token_response(request, ["assume_role"], project, user_obj, lifetime)

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
        project: tuple[str, str],
        user_obj: Json,
        lifetime: float,
    ) -> web.Response:
        now = time.time()
        # Real tokens are long PKI blobs starting "MII" (doc example "MIIatAYJKoZIhvcNAQcCoIIa...").
        token = "MIIatAYJKoZIhvcNAQcCoII" + secrets.token_urlsafe(1536)
        self._tokens[token] = _Issued(expires_at=now + lifetime)
        project_name, project_id = project
        assumed_by = user_obj.pop("assumed_by", None)
        domain = user_obj["domain"]
        token_body: Json = {
            "catalog": [] if "nocatalog" in request.query else self._catalog(project_name),
            "expires_at": _iam_time(now + lifetime),
            "issued_at": _iam_time(now),
            "methods": methods,
            "project": {"domain": dict(domain), "id": project_id, "name": project_name},
            "roles": [{"id": "0", "name": "op_auth"}, {"id": "1", "name": "te_admin"}],
            "user": user_obj,
        }
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
                        "id": _stable_id("endpoint", f"modelarts/{region}"),
                        "interface": "public",
                        "region": region,
                        "region_id": region,
                        "url": f"https://modelarts.{region}.myhuaweicloud.com",
                    }
                ],
                "id": _stable_id("service", "modelarts"),
                "name": "modelarts",
                "type": "modelarts",
            }
        ]


@dataclass
class Script:
    """How the fake model service answers; tests mutate ``fake.script`` between requests.

    ``stall_after`` and ``reset_after`` count ``data:`` events written on the wire: the role chunk
    is event 1, so 0 means "after the headers, before any event". For a non-streaming request
    either one, when set, applies before the headers (stall: never answer; reset: abort).
    """

    events: int = 5
    interval: float = 0.0
    header_delay: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None
    split_events: bool = False
    split_pause: float = 0.0
    payload_size: int = 0
    status: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake model service received it (multi-valued headers joined)."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes


# APIG error codes (API Gateway "Error Codes" table; ModelArts services sit behind APIG).
# The body shape {"error_code", "error_msg", "request_id"} is APIG's, e.g. the APIG.0301
# examples in "Common Errors Related to IAM Authentication Information".
_APIG_ERRORS: dict[int, tuple[str, str]] = {
    400: ("APIG.0201", "API request error."),
    401: ("APIG.0307", "The token must be updated."),
    403: ("APIG.0306", "API access denied."),
    404: ("APIG.0101", "The API does not exist or has not been published in the environment."),
    413: ("APIG.0201", "Request entity too large."),
    429: ("APIG.0308", "The throttling threshold has been reached."),
    500: ("APIG.0601", "Internal server error."),
    502: ("APIG.0201", "Backend unavailable."),
    503: ("APIG.0613", "The IAM service is currently unavailable."),
    504: ("APIG.0201", "Backend timeout."),
}
# A request without X-Auth-Token: APIG.0301 with this message (Huawei OCR FAQ "How Do I Handle
# the Error APIG.0301?"). Expired or revoked tokens get APIG.0307 "The token must be updated."
# (APIG error codes; IAM iam_30_0001: "If 'The token must be updated' is returned ... the token
# has expired or is invalid").
_APIG_NO_TOKEN = ("APIG.0301", "Incorrect IAM authentication information: x-auth-token not found")

# --- AK/SK and app authentication, as APIG answers it --------------------------------------------
# IAM AK/SK failures are APIG.0301 (API Gateway FAQ "Incorrect IAM authentication information",
# apig-faq-0003): "Get secretKey failed,ak:...,err:ak not exist" for an unknown AK, "verify aksk
# signature fail,canonicalRequest:..." (the gateway's canonical request, lines joined with "|")
# for a wrong signature; a stale X-Sdk-Date: "calc ak sk signature fail:signature expired"
# (SIS FAQ). App failures are APIG.0303 (apig-faq-0009 "Incorrect app authentication
# information"): "app not found, appkey ...", "verify signature fail, canonicalRequest:...",
# "signature expired, signature time:...,server time:...". APIG rejects an X-Sdk-Date more than
# 15 minutes away from its own clock ("API Request Signing Guide", Constructing a Standard
# Request). Where the docs give no exact text, the code's generic message from APIG's error-code
# table is used ("Incorrect IAM/app authentication information.").
SIGNATURE_MAX_SKEW = 15 * 60
_IAM_AUTH = "Incorrect IAM authentication information"
_APP_AUTH = "Incorrect app authentication information"
# ModelArts MaaS / API-key services (MaaS "Error Codes"): 400 ModelArts.81002 when Authorization
# is missing or not "Bearer ...", 401 ModelArts.81003 when the key does not parse or is unknown.
_MAAS_NO_KEY = (400, "ModelArts.81002", "Failed to get the authorization header.")
_MAAS_BAD_KEY = (401, "ModelArts.81003", "Invalid authorization header.")

_SDK_AUTH = re.compile(
    r"^SDK-HMAC-SHA256\s+Access=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-fA-F]+)$"
)
_SDK_DATE = re.compile(r"^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def _percent(text: str) -> bytes:
    """RFC 3986 percent-encoding of everything but unreserved bytes (the fake's own encoder)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        out += bytes((byte,)) if byte in _UNRESERVED else b"%%%02X" % byte
    return bytes(out)


def _verify_view(method: str, raw_path: str, raw_query: str) -> list[bytes]:
    """Method, URI and query lines of the canonical request, built the way APIG checks them."""
    uri = b"/".join(_percent(part) for part in unquote(raw_path).split("/"))
    if not uri.endswith(b"/"):
        uri += b"/"
    pairs: list[tuple[str, str]] = []
    for item in raw_query.split("&") if raw_query else []:
        if "=" in item:
            k, v = item.split("=", 1)
        else:
            k, v = item, ""
        if k:
            pairs.append((unquote(k), unquote(v)))
    query = b"&".join(_percent(k) + b"=" + _percent(v) for k, v in sorted(pairs))
    return [method.upper().encode(), uri, query]


def _sdk_time(value: str) -> float | None:
    """Epoch seconds of an X-Sdk-Date (``YYYYMMDDTHHMMSSZ``, UTC), None if malformed."""
    if not _SDK_DATE.match(value):
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _apig_error(status: int, code: str | None = None, message: str | None = None) -> web.Response:
    """An APIG-shaped error with a fresh 32-hex request id (also sent as X-Request-Id)."""
    default_code, default_message = _APIG_ERRORS.get(status, ("APIG.0201", "API request error."))
    request_id = uuid.uuid4().hex
    body = {
        "error_code": code or default_code,
        "error_msg": message or default_message,
        "request_id": request_id,
    }
    return web.json_response(body, status=status, headers={"X-Request-Id": request_id})


def _maas_error(status: int, code: str, message: str) -> web.Response:
    """MaaS' own error shape: ``{"error_code", "error_msg"}`` (MaaS "Error Codes")."""
    return web.json_response({"error_code": code, "error_msg": message}, status=status)


def _openai_error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    """vLLM's OpenAI-compatible error body (``object: error``, message, type, param, code)."""
    body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
    return web.json_response(body, status=status)


class FakeModelArts:
    """A ModelArts online service running an OpenAI-compatible LLM (vLLM-style) behind APIG.

    Routes live under ``base_path`` = ``/v1/infers/{service_id}``, the path of the API URL shown on
    a real-time service's "Usage Guides" tab; anything else is APIG's 404 APIG.0101.

    Authentication, chosen at deploy time on a real service, is whatever is configured here (any
    mix; none at all means an open service): ``token_checker`` (IAM token in X-Auth-Token),
    ``aksk`` (IAM AK -> SK, SDK-HMAC-SHA256 signatures; ``security_tokens`` AK -> the
    X-Security-Token a temporary AK must send), ``app_aksk`` (AppKey -> AppSecret, same
    signatures), ``app_codes`` (X-Apig-AppCode) and ``api_keys`` (``Authorization: Bearer``).
    Signatures are checked by this module's own code, against ``clock`` (15 minutes of skew).
    """

    def __init__(
        self,
        *,
        token_checker: Callable[[str], bool] | None = None,
        service_id: str = "2b7e5f0c3d4a4e8f9a1b6c7d8e9f0a1b",
        model: str = "qwen2-7b",
        api_keys: Iterable[str] = (),
        app_codes: Iterable[str] = (),
        aksk: Mapping[str, str] | None = None,
        app_aksk: Mapping[str, str] | None = None,
        security_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token_checker = token_checker
        self.api_keys: set[str] = set(api_keys)
        self.app_codes: set[str] = set(app_codes)
        self.aksk: dict[str, str] = dict(aksk or {})
        self.app_aksk: dict[str, str] = dict(app_aksk or {})
        self.security_tokens: dict[str, str] = dict(security_tokens or {})
        self.clock = clock
        self.authenticated: list[str] = []  # the mode that let each accepted request in
        self.service_id = service_id
        self.model = model
        self.base_path = f"/v1/infers/{service_id}"
        self.script = Script()
        self.requests: list[RecordedRequest] = []
        self.unauthorized = 0
        self.open_streams = 0
        self.disconnects = 0
        self.stream_closed = asyncio.Event()
        self.app = web.Application(
            client_max_size=MODELARTS_MAX_BODY, middlewares=[self._record_middleware()]
        )
        base = self.base_path
        self.app.router.add_post(f"{base}/v1/chat/completions", self._chat)
        self.app.router.add_post(f"{base}/v1/sse", self._sse)
        self.app.router.add_get(f"{base}/v1/models", self._models)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    def _record_middleware(self) -> Middleware:
        """Record every request, rejected ones included, before any other processing."""

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                self._append(request, b"")
                return _apig_error(413)
            self._append(request, body)
            return await handler(request)

        return record

    def _append(self, request: web.Request, body: bytes) -> None:
        headers: dict[str, str] = {}
        for key in request.headers:
            if key not in headers:
                headers[key] = ", ".join(request.headers.getall(key))
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query_string=request.query_string,
                headers=headers,
                body=body,
            )
        )

    async def _reject(self, request: web.Request) -> web.Response | None:
        """APIG's answer if the request must not reach the model (credential, scripted status)."""
        refused = await self._authenticate(request)
        if refused is not None:
            self.unauthorized += 1
            return refused
        status = self.script.status
        if status is not None:
            if status == 401:
                self.unauthorized += 1
            return _apig_error(status)
        return None

    async def _authenticate(self, request: web.Request) -> web.Response | None:
        """None if a configured mode accepts the request (recorded), else that mode's error."""
        iam = self.token_checker is not None or bool(self.aksk)
        app = bool(self.app_aksk or self.app_codes)
        if not (iam or app or self.api_keys):
            return None  # a service deployed without authentication
        headers = request.headers
        authorization = headers.get("Authorization", "")
        if authorization.startswith("SDK-HMAC-SHA256") and (self.aksk or self.app_aksk):
            return await self._check_signature(request, authorization)
        if authorization.startswith("Bearer ") and self.api_keys:
            if authorization[len("Bearer ") :] not in self.api_keys:
                return _maas_error(*_MAAS_BAD_KEY)
            self._accept("api_key")
            return None
        code = headers.get("X-Apig-AppCode")
        if code is not None and self.app_codes:
            if code not in self.app_codes:
                return _apig_error(401, "APIG.0303", f"{_APP_AUTH}.")
            self._accept("app_code")
            return None
        token = headers.get("X-Auth-Token")
        if token and self.token_checker is not None:
            if not self.token_checker(token):
                return _apig_error(401)
            self._accept("token")
            return None
        if self.api_keys:
            return _maas_error(*_MAAS_NO_KEY)
        if iam:
            return _apig_error(401, *_APIG_NO_TOKEN)
        return _apig_error(401, "APIG.0303", f"{_APP_AUTH}.")

    def _accept(self, mode: str) -> None:
        self.authenticated.append(mode)

    async def _check_signature(
        self, request: web.Request, authorization: str
    ) -> web.Response | None:
        """Verify an SDK-HMAC-SHA256 signature independently of the gateway's signer."""
        m = _SDK_AUTH.match(authorization)
        key = m.group(1) if m else ""
        if key in self.aksk:
            code, prefix, secret, mode = "APIG.0301", _IAM_AUTH, self.aksk[key], "aksk"
        elif key in self.app_aksk:
            code, prefix, secret, mode = "APIG.0303", _APP_AUTH, self.app_aksk[key], "app_aksk"
        elif self.aksk:
            return _apig_error(
                401, "APIG.0301", f"{_IAM_AUTH}: Get secretKey failed,ak:{key},err:ak not exist"
            )
        else:
            return _apig_error(401, "APIG.0303", f"{_APP_AUTH}: app not found, appkey {key}")
        if m is None:
            return _apig_error(401, code, f"{prefix}.")
        signed_names = m.group(2).split(";")
        claimed = m.group(3).lower()
        sdk_date = request.headers.get("X-Sdk-Date", "")
        when = _sdk_time(sdk_date)
        if "x-sdk-date" not in signed_names or when is None:
            return _apig_error(401, code, f"{prefix}.")
        now = self.clock()
        if abs(now - when) > SIGNATURE_MAX_SKEW:
            if mode == "aksk":
                return _apig_error(
                    401, code, f"{prefix}: calc ak sk signature fail:signature expired"
                )
            server_time = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
            return _apig_error(
                401,
                code,
                f"{prefix}: signature expired, signature time:{sdk_date},server time:{server_time}",
            )
        raw_path, _, raw_query = request.raw_path.partition("?")  # as sent, not decoded
        lines = _verify_view(request.method, raw_path, raw_query)
        header_lines = []
        for name in signed_names:
            values = request.headers.getall(name, [])
            header_lines.append(name.encode() + b":" + ",".join(v.strip() for v in values).encode())
        body_hash = hashlib.sha256(await request.read()).hexdigest()
        canonical = b"\n".join(
            [*lines, b"\n".join(header_lines) + b"\n", m.group(2).encode(), body_hash.encode()]
        )
        digest = hashlib.sha256(canonical).hexdigest()
        to_sign = f"SDK-HMAC-SHA256\n{sdk_date}\n{digest}".encode()
        expected = hmac.new(secret.encode(), to_sign, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, claimed):
            shown = canonical.decode("utf-8", "replace").replace("\n", "|")
            what = "verify aksk signature fail" if mode == "aksk" else "verify signature fail"
            return _apig_error(401, code, f"{prefix}: {what}, canonicalRequest:{shown}")
        required = self.security_tokens.get(key) if mode == "aksk" else None
        if required is not None and (
            "x-security-token" not in signed_names
            or not hmac.compare_digest(request.headers.get("X-Security-Token", ""), required)
        ):
            return _apig_error(401, code, f"{prefix}.")
        self._accept(mode)
        return None

    async def _not_found(self, request: web.Request) -> web.Response:
        return _apig_error(404)

    async def _models(self, request: web.Request) -> web.Response:
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        created = int(time.time())
        model = {"id": self.model, "object": "model", "created": created, "owned_by": "vllm"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _openai_error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _openai_error(400, "Field 'messages' is required and must be a list.")
        if body.get("stream") is True:
            return await self._stream(request, body)
        return await self._complete(request, body)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """ModelArts' SSE endpoint: always streams; the body is the custom image's business."""
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            body = {}
        return await self._stream(request, body if isinstance(body, dict) else {})

    # --- answers --------------------------------------------------------------------------------

    def _model_name(self, body: Json) -> str:
        """vLLM echoes the requested model name; the fake accepts any so aliases pass through."""
        requested = body.get("model")
        return requested if isinstance(requested, str) and requested else self.model

    def _content(self, index: int) -> str:
        text = f"token{index} "
        return text + "x" * max(0, self.script.payload_size - len(text))

    def _usage(self, body: Json) -> Json:
        prompt = 0
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                prompt += len(str(message.get("content", "")).split())
        completion = self.script.events
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _complete(self, request: web.Request, body: Json) -> web.StreamResponse:
        """A non-streaming ``chat.completion``; stall/reset, when scripted, hit before headers."""
        script = self.script
        if script.header_delay > 0:
            await asyncio.sleep(script.header_delay)
        if script.reset_after is not None:
            _abort(request)
            return web.Response()
        if script.stall_after is not None:
            await _forever()
        content = "".join(self._content(i) for i in range(script.events))
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model_name(body),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(body),
        }
        return web.json_response(completion)

    def _events(self, body: Json) -> Iterator[bytes]:
        """The SSE events of one answer, OpenAI ``chat.completion.chunk`` framing.

        Role chunk, ``events`` content chunks, a finish chunk, then (with
        ``stream_options.include_usage``) a usage chunk whose ``choices`` is empty, as the OpenAI
        API reference describes, and finally ``data: [DONE]``.
        """
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self._model_name(body)

        def chunk(choices: list[Json], **extra: Any) -> bytes:
            payload = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        def choice(delta: Json, finish: str | None = None) -> list[Json]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        yield chunk(choice({"role": "assistant", "content": ""}))
        for i in range(self.script.events):
            yield chunk(choice({"content": self._content(i)}))
        yield chunk(choice({}, "stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            yield chunk([], usage=self._usage(body))
        yield b"data: [DONE]\n\n"

    async def _stream(self, request: web.Request, body: Json) -> web.StreamResponse:
        """Write the answer as SSE, one ``write`` per event, following the script.

        The stream counts from here (header delay included) until the handler ends; a client that
        goes away shows up as ConnectionResetError on write or as cancellation of a pause or stall
        (``handler_cancellation``), and is counted in ``disconnects``.
        """
        script = self.script
        response = web.StreamResponse(status=200)
        response.headers["Content-Type"] = SSE_CONTENT_TYPE
        self.open_streams += 1
        try:
            if script.header_delay > 0:
                await asyncio.sleep(script.header_delay)
            await response.prepare(request)
            for written, event in enumerate(self._events(body)):
                if script.stall_after is not None and written >= script.stall_after:
                    await _forever()
                if script.reset_after is not None and written >= script.reset_after:
                    _abort(request)
                    return response
                if written > 0 and script.interval > 0:
                    await asyncio.sleep(script.interval)
                if script.split_events:
                    middle = len(event) // 2  # inside the data line's JSON
                    await response.write(event[:middle])
                    if script.split_pause > 0:
                        await asyncio.sleep(script.split_pause)
                    await response.write(event[middle:])
                else:
                    await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.open_streams -= 1
            self.stream_closed.set()
        return response


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without a clean end, as a crashed upstream does."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _forever() -> None:
    """Wait for ever; only cancellation (client gone, server shutdown) ends it."""
    await asyncio.get_running_loop().create_future()


@dataclass
class FakeCloud:
    """Both fakes wired together (ModelArts checks tokens with the IAM) and serving on loopback."""

    iam: FakeIAM
    modelarts: FakeModelArts
    iam_url: str
    service_url: str
    runners: list[web.AppRunner] = field(default_factory=list)

    def iam_password_config(self) -> dict[str, Any]:
        """A gateway ``iam_password`` credential (as parsed YAML) for this cloud's user."""
        return {
            "type": "iam_password",
            "iam_url": self.iam_url,
            "domain": self.iam.domain,
            "user": self.iam.user,
            "password": self.iam.password,
            "project": next(iter(self.iam.projects)),
        }

    async def close(self) -> None:
        """Stop both servers, newest first."""
        while self.runners:
            await self.runners.pop().cleanup()


async def start_fake_cloud(**iam_kwargs: Any) -> FakeCloud:
    """Start a FakeIAM and a FakeModelArts that accepts only that IAM's tokens."""
    iam = FakeIAM(**iam_kwargs)
    modelarts = FakeModelArts(token_checker=iam.is_valid)
    iam_runner, iam_url = await serve_on_loopback(iam.app)
    try:
        ma_runner, ma_url = await serve_on_loopback(modelarts.app)
    except BaseException:
        await iam_runner.cleanup()
        raise
    return FakeCloud(
        iam=iam,
        modelarts=modelarts,
        iam_url=iam_url,
        service_url=f"{ma_url}{modelarts.base_path}",
        runners=[iam_runner, ma_runner],
    )
