"""Configuration: YAML → ``${VAR}`` expansion → units → validation → frozen dataclasses.

Loading is pure: no logging, no ``sys.exit``. Every problem is collected with its dotted key
(``routes[0].upstream: ...``) so ``check`` can print them all at once; ``load_config`` raises a
single :class:`ConfigError` carrying the list.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from yarl import URL


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A string that never shows itself in repr, str, f-strings or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --- typed settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Per-phase upstream timeouts in seconds (0 = off for idle/total)."""

    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 1800.0


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    upstream: URL
    credential: str
    models: tuple[str, ...] = ()
    max_body: int = 8 * 1024 * 1024
    max_concurrency: int = 64
    heartbeat: float = 15.0
    timeouts: Timeouts = field(default_factory=Timeouts)

    @cached_property
    def upstream_base(self) -> str:
        """``upstream`` as text without a trailing slash, for joining request paths per call."""
        return str(self.upstream).rstrip("/")


@dataclass(frozen=True)
class IamPasswordCredential:
    name: str
    iam_url: URL
    domain: str
    user: str
    password: Secret
    project: str | None
    project_id: str | None
    refresh_margin: float = 300.0
    region: str | None = None
    cache_file: Path | None = None  # on-disk token cache (mode 0600)


@dataclass(frozen=True)
class StaticTokenCredential:
    name: str
    token: Secret


@dataclass(frozen=True)
class TokenFileCredential:
    """``type: token`` with ``token_file``: re-read whenever the file changes."""

    name: str
    token_file: Path


@dataclass(frozen=True)
class NoCredential:
    name: str


@dataclass(frozen=True)
class ApiKeyCredential:
    """``Authorization: Bearer <key>`` (API-key online services, ModelArts MaaS)."""

    name: str
    key: Secret


@dataclass(frozen=True)
class AppCodeCredential:
    """``X-Apig-AppCode: <code>`` (APIG app authentication, simple mode)."""

    name: str
    code: Secret


@dataclass(frozen=True)
class AkSkCredential:
    """IAM access keys: every request signed with SDK-HMAC-SHA256."""

    name: str
    ak: str
    sk: Secret
    security_token: Secret | None = None  # temporary keys: sent (and signed) as X-Security-Token


@dataclass(frozen=True)
class AppAkSkCredential:
    """APIG app authentication: AppKey/AppSecret, signed like ``aksk``."""

    name: str
    app_key: str
    app_secret: Secret


@dataclass(frozen=True)
class AgencyCredential:
    """A token for another account, through an agency (IAM ``assume_role``)."""

    name: str
    via: str  # the credential whose token authorises the assume_role request
    iam_url: URL
    domain_name: str | None
    domain_id: str | None
    agency_name: str
    project: str | None
    project_id: str | None
    refresh_margin: float = 300.0
    region: str | None = None
    cache_file: Path | None = None


CredentialConfig = (
    IamPasswordCredential
    | StaticTokenCredential
    | TokenFileCredential
    | NoCredential
    | ApiKeyCredential
    | AppCodeCredential
    | AkSkCredential
    | AppAkSkCredential
    | AgencyCredential
)
# Types whose credential yields an IAM token, so an agency may use it as ``via``.
TOKEN_CREDENTIAL_TYPES = ("iam_password", "agency", "token")


@dataclass(frozen=True)
class ApiKey:
    """A downstream client's key, kept only as its SHA-256 digest."""

    name: str
    sha256: bytes = field(repr=False)
    max_concurrency: int | None = None
    models: tuple[str, ...] | None = None  # None: every model


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[ApiKey, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    allow_unauthenticated_remote: bool = False
    shutdown_grace: float = 30.0
    header_timeout: float = 30.0

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    listen: Listen
    credentials: Mapping[str, CredentialConfig]
    routes: tuple[Route, ...]


# --- units ------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30, '500ms', '30s' or '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 30, '500ms', '30s' or '5m', got {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number or a string like ``"8MiB"``, ``"512KiB"``, ``"1MB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 1048576 or '8MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError(f"expected a size like 1048576 or '8MiB', got {value!r}")
    if size < 0:
        raise ValueError("must not be negative")
    return size


# --- ${VAR} expansion -----------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, key: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: _expand(v, _join(key, str(k)), environ, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]", environ, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(f"{key}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, value)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --- validation helpers -------------------------------------------------------------------


class _Section:
    """A mapping being read: remembers which keys were used so unknown keys can be reported."""

    def __init__(self, raw: object, key: str, problems: list[str]) -> None:
        self.key = key
        self.problems = problems
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(f"{key or 'config'}: must be a mapping")
            raw = {}
        self.raw: dict[str, Any] = raw
        self.used: set[str] = set()

    def sub(self, name: str) -> str:
        return _join(self.key, name)

    def problem(self, name: str, message: str) -> None:
        prefix = f"{self.sub(name)}: "
        if any(p.startswith(prefix) for p in self.problems):
            return  # one problem per key (e.g. a missing ${VAR} is not also "empty")
        self.problems.append(prefix + message)

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.raw.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.raw

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.get(name)
        if value is None:
            if required:
                self.problem(name, "is required")
            return default or ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(name, "must be a string")
            return default or ""
        text = str(value)
        if required and not text:
            self.problem(name, "must not be empty")
        return text

    def convert(self, name: str, default: Any, parse: Callable[[object], Any]) -> Any:
        value = self.get(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # from ${VAR} expansion
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, "must be a whole number")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            self.problem(name, f"must be >= {minimum}{upper}")
            return default
        return value

    def finish(self) -> None:
        for name in self.raw:
            if name not in self.used:
                self.problems.append(f"{self.sub(str(name))}: unknown key")


def _url(section: _Section, name: str) -> URL:
    text = section.string(name, required=True)
    if not text:
        return URL()
    try:
        url = URL(text)
    except ValueError as exc:
        section.problem(name, f"not a valid URL ({exc})")
        return URL()
    if url.scheme not in ("http", "https") or not url.host:
        section.problem(name, "must be an http:// or https:// URL with a host")
    elif url.query_string or url.fragment:
        section.problem(name, "must not have a query or fragment")
    return url


# --- sections ---------------------------------------------------------------------------------


def _string_list(s: _Section, name: str) -> tuple[str, ...]:
    value = s.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        s.problem(name, "must be a list of non-empty strings")
        return ()
    return tuple(value)


def _parse_api_key(raw: object, key: str, problems: list[str]) -> ApiKey | None:
    s = _Section(raw, key, problems)
    name = s.string("name", required=True)
    plain = s.string("key")
    digest_hex = s.string("sha256").lower()
    digest = b""
    if plain and digest_hex:
        s.problem("key", "give either key or sha256, not both")
    elif plain:
        digest = hashlib.sha256(plain.encode()).digest()
    elif digest_hex:
        if not re.fullmatch(r"[0-9a-f]{64}", digest_hex):
            s.problem("sha256", "must be 64 hex digits (modelarts-gateway hash-key prints it)")
        else:
            digest = bytes.fromhex(digest_hex)
    else:
        s.problem("key", "is required (or sha256)")
    max_concurrency = s.integer("max_concurrency", 0, 1) if s.has("max_concurrency") else None
    models = _string_list(s, "models") if s.has("models") else None
    s.finish()
    if not name or not digest:
        return None
    return ApiKey(name, digest, max_concurrency or None, models)


def _parse_listen(raw: object, problems: list[str]) -> Listen:
    s = _Section(raw, "listen", problems)
    keys_raw = s.get("api_keys", [])
    keys: list[ApiKey] = []
    if not isinstance(keys_raw, list):
        s.problem("api_keys", "must be a list of {name, key} or {name, sha256}")
    else:
        for i, item in enumerate(keys_raw):
            parsed = _parse_api_key(item, f"listen.api_keys[{i}]", problems)
            if parsed is None:
                continue
            if any(k.name == parsed.name for k in keys):
                problems.append(f"listen.api_keys[{i}].name: duplicate key name {parsed.name!r}")
            if any(k.sha256 == parsed.sha256 for k in keys):
                problems.append(f"listen.api_keys[{i}]: the same key is listed twice")
            keys.append(parsed)
    allow_remote = s.get("allow_unauthenticated_remote", False)
    if not isinstance(allow_remote, bool):
        s.problem("allow_unauthenticated_remote", "must be true or false")
        allow_remote = False
    listen = Listen(
        host=s.string("host", "127.0.0.1") or "127.0.0.1",
        port=s.integer("port", 8080, 0, 65535),
        api_keys=tuple(keys),
        allowed_hosts=tuple(h.lower() for h in _string_list(s, "allowed_hosts")),
        allowed_origins=tuple(o.rstrip("/") for o in _string_list(s, "allowed_origins")),
        allow_unauthenticated_remote=allow_remote,
        shutdown_grace=s.convert("shutdown_grace", 30.0, parse_duration),
        header_timeout=s.convert("header_timeout", 30.0, parse_duration),
    )
    s.finish()
    return listen


def check_exposure(listen: Listen) -> str | None:
    """Why this listen address must not start as configured, or None.

    Checked after ``--host`` overrides too, so the CLI calls it on the final settings.
    """
    if listen.is_loopback or listen.api_keys or listen.allow_unauthenticated_remote:
        return None
    return (
        f"listen.host: {listen.host!r} is reachable from other machines and listen.api_keys "
        "is empty: anyone who can reach it would use your cloud token. Add listen.api_keys, "
        "or set listen.allow_unauthenticated_remote: true if that is really intended"
    )


# Huawei Cloud region ids: cn-southwest-2, ap-southeast-1, eu-west-101, ru-moscow-1, ...
_REGION = re.compile(r"^[a-z]{2,}(?:-[a-z]+)+-\d+$")


@dataclass(frozen=True)
class _IamScope:
    iam_url: URL
    project: str | None
    project_id: str | None
    region: str | None


def _iam_scope(s: _Section) -> _IamScope:
    """``iam_url`` and the project scope; ``region`` alone implies both.

    ``region: cn-southwest-2`` means ``iam_url: https://iam.cn-southwest-2.myhuaweicloud.com``
    (the regional IAM endpoint, "Regions and Endpoints") and ``project: cn-southwest-2`` (each
    region's default project is named after it); explicit keys win.
    """
    region = s.string("region") or None
    if region and not _REGION.match(region):
        s.problem("region", f"not a region id like cn-southwest-2, got {region!r}")
        region = None
    if region and not s.has("iam_url"):
        iam_url = URL(f"https://iam.{region}.myhuaweicloud.com")
    else:
        iam_url = _url(s, "iam_url")
    project = s.string("project") or None
    project_id = s.string("project_id") or None
    if project and project_id:
        s.problem("project", "give either project or project_id, not both")
    if not project and not project_id:
        if region:
            project = region
        else:
            s.problem(
                "project",
                "is required (a project name such as cn-southwest-2, or project_id, or region)",
            )
    return _IamScope(iam_url, project, project_id, region)


def _path(s: _Section, name: str) -> Path | None:
    text = s.string(name)
    if s.has(name) and not text:
        s.problem(name, "must not be empty")
    return Path(text) if text else None


def _parse_iam_password(s: _Section, name: str) -> CredentialConfig:
    scope = _iam_scope(s)
    margin = s.convert("refresh_margin", 300.0, parse_duration)
    return IamPasswordCredential(
        name=name,
        iam_url=scope.iam_url,
        domain=s.string("domain", required=True),
        user=s.string("user", required=True),
        password=Secret(s.string("password", required=True)),
        project=scope.project,
        project_id=scope.project_id,
        refresh_margin=margin,
        region=scope.region,
        cache_file=_path(s, "cache_file"),
    )


def _parse_agency(s: _Section, name: str) -> CredentialConfig:
    scope = _iam_scope(s)
    domain_name = s.string("domain_name") or None
    domain_id = s.string("domain_id") or None
    if domain_name and domain_id:
        s.problem("domain_name", "give either domain_name or domain_id, not both")
    if not domain_name and not domain_id:
        s.problem("domain_name", "is required (the delegating account's name, or domain_id)")
    return AgencyCredential(
        name=name,
        via=s.string("via", required=True),
        iam_url=scope.iam_url,
        domain_name=domain_name,
        domain_id=domain_id,
        agency_name=s.string("agency_name", required=True),
        project=scope.project,
        project_id=scope.project_id,
        refresh_margin=s.convert("refresh_margin", 300.0, parse_duration),
        region=scope.region,
        cache_file=_path(s, "cache_file"),
    )


def _parse_token(s: _Section, name: str) -> CredentialConfig:
    if s.has("token") and s.has("token_file"):
        s.used.add("token")
        s.problem("token", "give either token or token_file, not both")
    path = _path(s, "token_file")
    if path is not None:
        return TokenFileCredential(name=name, token_file=path)
    if not s.has("token"):
        s.problem("token", "is required (or token_file)")
        return StaticTokenCredential(name=name, token=Secret(""))
    return StaticTokenCredential(name=name, token=Secret(s.string("token", required=True)))


def _parse_api_key_credential(s: _Section, name: str) -> CredentialConfig:
    return ApiKeyCredential(name=name, key=Secret(s.string("key", required=True)))


def _parse_app_code(s: _Section, name: str) -> CredentialConfig:
    return AppCodeCredential(name=name, code=Secret(s.string("code", required=True)))


def _parse_aksk(s: _Section, name: str) -> CredentialConfig:
    token = s.string("security_token")
    if s.has("security_token") and not token:
        s.problem("security_token", "must not be empty (leave it out for permanent keys)")
    return AkSkCredential(
        name=name,
        ak=s.string("ak", required=True),
        sk=Secret(s.string("sk", required=True)),
        security_token=Secret(token) if token else None,
    )


def _parse_app_aksk(s: _Section, name: str) -> CredentialConfig:
    return AppAkSkCredential(
        name=name,
        app_key=s.string("app_key", required=True),
        app_secret=Secret(s.string("app_secret", required=True)),
    )


def _parse_none(s: _Section, name: str) -> CredentialConfig:
    return NoCredential(name=name)


CREDENTIAL_TYPES: dict[str, Callable[[_Section, str], CredentialConfig]] = {
    "iam_password": _parse_iam_password,
    "token": _parse_token,
    "none": _parse_none,
    "api_key": _parse_api_key_credential,
    "app_code": _parse_app_code,
    "aksk": _parse_aksk,
    "app_aksk": _parse_app_aksk,
    "agency": _parse_agency,
}


def _parse_credentials(raw: object, problems: list[str]) -> dict[str, CredentialConfig]:
    top = _Section(raw, "credentials", problems)
    result: dict[str, CredentialConfig] = {}
    for name in list(top.raw):
        top.used.add(name)
        s = _Section(top.raw[name], top.sub(str(name)), problems)
        kind = s.string("type", required=True)
        parser = CREDENTIAL_TYPES.get(kind)
        if parser is None:
            if kind:
                s.problem("type", f"unknown type {kind!r} (one of: {', '.join(CREDENTIAL_TYPES)})")
            continue
        result[str(name)] = parser(s, str(name))
        s.finish()
    _check_agencies(top, result)
    return result


def _check_agencies(top: _Section, result: Mapping[str, CredentialConfig]) -> None:
    """Each agency's ``via`` names another credential that yields an IAM token, with no loop."""
    for name, cfg in result.items():
        if not isinstance(cfg, AgencyCredential) or not cfg.via:
            continue
        key = f"{top.sub(name)}.via"
        raw = top.raw.get(cfg.via)
        kind = raw.get("type") if isinstance(raw, dict) else None
        if cfg.via == name:
            top.problems.append(f"{key}: must name another credential, not this one")
        elif raw is None:
            known = ", ".join(n for n in top.raw if n != name) or "none defined"
            top.problems.append(f"{key}: no credential named {cfg.via!r} (known: {known})")
        elif kind not in TOKEN_CREDENTIAL_TYPES:
            top.problems.append(
                f"{key}: credential {cfg.via!r} has type {kind!r}, which yields no IAM token "
                f"(via needs one of: {', '.join(TOKEN_CREDENTIAL_TYPES)})"
            )
        else:
            chain = [name]
            current: CredentialConfig | None = cfg
            while isinstance(current, AgencyCredential) and current.via in result:
                if current.via in chain:
                    loop = " -> ".join([*chain[chain.index(current.via) :], current.via])
                    top.problems.append(f"{key}: agencies form a loop ({loop})")
                    break
                chain.append(current.via)
                current = result[current.via]


def _parse_timeouts(raw: object, key: str, problems: list[str]) -> Timeouts:
    s = _Section(raw, key, problems)
    d = Timeouts()
    t = Timeouts(
        connect=s.convert("connect", d.connect, parse_duration),
        first_byte=s.convert("first_byte", d.first_byte, parse_duration),
        idle=s.convert("idle", d.idle, parse_duration),
        total=s.convert("total", d.total, parse_duration),
    )
    for name in ("connect", "first_byte"):
        if s.has(name) and getattr(t, name) <= 0:
            s.problem(name, "must be > 0")
    s.finish()
    return t


def _parse_route(
    raw: object, key: str, credentials: Mapping[str, object], problems: list[str]
) -> Route:
    s = _Section(raw, key, problems)
    name = s.string("name", required=True)
    path = s.string("path", "/v1")
    if not path.startswith("/"):
        s.problem("path", "must start with /")
    path = "/" + path.strip("/") if path.strip("/") else "/"
    credential = s.string("credential", required=True)
    if credential and credential not in credentials:
        known = ", ".join(credentials) or "none defined"
        s.problem("credential", f"no credential named {credential!r} (known: {known})")
    models_raw = s.get("models", [])
    models: tuple[str, ...] = ()
    if not isinstance(models_raw, list) or not all(isinstance(m, str) and m for m in models_raw):
        s.problem("models", "must be a list of model names")
    else:
        models = tuple(models_raw)
    route = Route(
        name=name,
        path=path,
        upstream=_url(s, "upstream"),
        credential=credential,
        models=models,
        max_body=s.convert("max_body", 8 * 1024 * 1024, parse_size),
        max_concurrency=s.integer("max_concurrency", 64, 1),
        heartbeat=s.convert("heartbeat", 15.0, parse_duration),
        timeouts=_parse_timeouts(s.get("timeouts"), s.sub("timeouts"), problems),
    )
    s.finish()
    return route


def _parse_routes(
    raw: object, credentials: Mapping[str, object], problems: list[str]
) -> tuple[Route, ...]:
    if raw is None:
        problems.append("routes: at least one route is required")
        return ()
    if not isinstance(raw, list) or not raw:
        problems.append("routes: must be a non-empty list")
        return ()
    routes = tuple(
        _parse_route(item, f"routes[{i}]", credentials, problems) for i, item in enumerate(raw)
    )
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.name and route.name in seen:
            problems.append(f"routes[{i}].name: duplicate route name {route.name!r}")
        seen.add(route.name)
    by_path: dict[str, list[int]] = {}
    for i, route in enumerate(routes):
        by_path.setdefault(route.path, []).append(i)
    for indexes in by_path.values():
        fallbacks = [i for i in indexes if not routes[i].models]
        if len(fallbacks) > 1:
            problems.append(
                f"routes[{fallbacks[1]}].models: routes on path {routes[fallbacks[1]].path!r} "
                "share it, so each but one must list its models"
            )
        claimed: dict[str, int] = {}
        for i in indexes:
            for model in routes[i].models:
                if model in claimed:
                    problems.append(
                        f"routes[{i}].models: model {model!r} is already served by "
                        f"routes[{claimed[model]}] on the same path"
                    )
                claimed[model] = i
    return routes


def parse_settings(raw: object, environ: Mapping[str, str]) -> Settings:
    """Validate an already-parsed YAML document; raises :class:`ConfigError`."""
    problems: list[str] = []
    expanded = _expand(raw, "", environ, problems)
    top = _Section(expanded, "", problems)
    listen = _parse_listen(top.get("listen"), problems)
    credentials = _parse_credentials(top.get("credentials"), problems)
    routes = _parse_routes(top.get("routes"), credentials, problems)
    top.finish()
    exposure = check_exposure(listen)
    if exposure:
        problems.append(exposure)
    if problems:
        raise ConfigError(problems)
    return Settings(listen=listen, credentials=credentials, routes=routes)


def load_config(path: str | Path, environ: Mapping[str, str]) -> Settings:
    """Read, expand and validate a YAML config file; raises :class:`ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse_settings(raw, environ)
