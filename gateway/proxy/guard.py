"""Who may use the gateway: downstream API keys, and Host/Origin checks against browsers.

An unauthenticated gateway on 127.0.0.1 holds a live cloud token, so a web page open in the
user's browser must not be able to use it: a foreign ``Origin`` is refused (no CORS unless
configured), and so is a ``Host`` that is not ours (DNS rebinding makes an attacker's name
resolve to 127.0.0.1, but the browser still sends the attacker's name as Host).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from aiohttp import web

from gateway.config.model import ApiKey, Listen
from gateway.errors import Forbidden, Unauthorized

# Sec-Fetch-Site values (Fetch Metadata) of a request another site's page made.
CROSS_SITE = frozenset(("cross-site", "same-site"))
LOCAL_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
WILDCARDS = frozenset(("0.0.0.0", "::", ""))


def hash_key(key: str) -> str:
    """The ``sha256`` form of a key for ``listen.api_keys`` (the config need not hold the key)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _host_name(host_header: str) -> str:
    """The name part of a Host header: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


class Guard:
    """Decides, before any routing, whether a request may use the gateway at all."""

    def __init__(self, listen: Listen) -> None:
        self.keys = listen.api_keys
        self.origins = frozenset(listen.allowed_origins)
        hosts = set(LOCAL_NAMES) | set(listen.allowed_hosts)
        if listen.host.lower() not in WILDCARDS:
            hosts.add(listen.host.lower().strip("[]"))
        self.hosts = frozenset(hosts)
        # Behind a wildcard listener with keys (team mode) clients reach us by names we cannot
        # know (pod IPs, service names); keys already stop a browser page there.
        wildcard_team = listen.host in WILDCARDS and bool(listen.api_keys)
        self.check_host = "*" not in hosts and not (wildcard_team and not listen.allowed_hosts)
        self.any_origin = "*" in self.origins
        # Host header values seen, and whether each is ours: clients send the same one on every
        # request (bounded: the value is the client's choice)
        self._hosts_seen: dict[str, bool] = {}

    def allowed_origin(self, request: web.Request) -> str | None:
        """The request's Origin when it is allowed cross-origin (CORS), else None."""
        origin = request.headers.get("Origin")
        if origin is not None and (self.any_origin or origin.rstrip("/") in self.origins):
            return origin
        return None

    def check(self, request: web.Request) -> ApiKey | None:
        """The caller's key (None when no keys are configured); raises 401/403 otherwise."""
        if self.check_host:
            host = request.headers.get("Host")
            if host is not None and not self._host_allowed(host):
                raise Forbidden(
                    "this Host is not allowed (add it to listen.allowed_hosts)",
                    code="host_not_allowed",
                )
        origin = request.headers.get("Origin")
        if origin is not None and self.allowed_origin(request) is None:
            raise Forbidden(
                "cross-origin requests are not allowed (see listen.allowed_origins)",
                code="origin_not_allowed",
            )
        # <img src>, <script src>, a top-level GET: no Origin, but the browser marks them
        site = request.headers.get("Sec-Fetch-Site")
        if (
            site is not None
            and site.strip().lower() in CROSS_SITE
            and (origin is None or self.allowed_origin(request) is None)
        ):
            raise Forbidden(
                "cross-site requests are not allowed (see listen.allowed_origins)",
                code="origin_not_allowed",
            )
        if not self.keys:
            return None
        if origin is not None and request.method == "OPTIONS":
            # A CORS preflight (its Origin is allowed, checked above) never carries credentials
            # (Fetch standard, "CORS-preflight request"); the proxy answers it, nothing goes on.
            return None
        return self._key(request.headers.get("Authorization", ""))

    def _host_allowed(self, host: str) -> bool:
        allowed = self._hosts_seen.get(host)
        if allowed is None:
            name = _host_name(host)
            allowed = name in self.hosts or is_loopback_host(name)
            if len(self._hosts_seen) >= 1024:
                self._hosts_seen.clear()
            self._hosts_seen[host] = allowed
        return allowed

    def _key(self, authorization: str) -> ApiKey:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized(
                "an API key is required: send it as 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found: ApiKey | None = None
        for key in self.keys:  # every key compared, in constant time: no early exit
            if hmac.compare_digest(key.sha256, digest):
                found = key
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found


CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project"
)


def add_cors(response: web.StreamResponse, origin: str) -> None:
    """CORS headers for an allowed origin (``listen.allowed_origins``)."""
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
    response.headers.add("Vary", "Origin")


def preflight(origin: str, request: web.Request) -> web.Response:
    """The answer to a CORS preflight from an allowed origin."""
    response = web.Response(status=204)
    add_cors(response, origin)
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", CORS_ALLOW_HEADERS
    )
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(listen: Listen) -> str | None:
    """Why this listen address must not start as configured, or None.

    Checked after ``--host`` overrides too, so the CLI calls it on the final settings.
    """
    if is_loopback_host(listen.host) or listen.api_keys or listen.allow_unauthenticated_remote:
        return None
    return (
        f"listen.host: {listen.host!r} is reachable from other machines and listen.api_keys "
        "is empty: anyone who can reach it would use your cloud token. Add listen.api_keys, "
        "or set listen.allow_unauthenticated_remote: true if that is really intended"
    )
