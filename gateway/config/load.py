"""Configuration: YAML → ``${VAR}`` expansion → units → validation → frozen dataclasses.

Loading is pure: no logging, no ``sys.exit``. Every problem is collected with its dotted key
(``routes[0].upstream: ...``) so ``check`` can print them all at once; ``load_config`` raises a
single :class:`ConfigError` carrying the list."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from gateway.config import sdk_env
from gateway.config.env import expand, join_key
from gateway.config.model import (
    DEFAULT_METADATA_URL,
    LIMIT_NAMES,
    TOKEN_CREDENTIAL_TYPES,
    AgencyCredential,
    AkSkCredential,
    ApiKey,
    ApiKeyCredential,
    AppAkSkCredential,
    AppCodeCredential,
    CredentialConfig,
    EcsMetadataCredential,
    IamPasswordCredential,
    KeyLimits,
    LimitsStore,
    Listen,
    NoCredential,
    PodIdentityCredential,
    Route,
    SdkDefaultCredential,
    Secret,
    Settings,
    StaticTokenCredential,
    Timeouts,
    TokenFileCredential,
    WorkloadIdentityCredential,
)
from gateway.config.units import parse_duration, parse_size
from gateway.proxy.guard import check_exposure


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
        return join_key(self.key, name)

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


MIN_KEY_LENGTH = 20
"""A plaintext key this short could be guessed at a few thousand tries a second."""


def _key_limits(s: _Section, defaults: KeyLimits) -> KeyLimits:
    """The limits an entry sets, each over its default; 0 is "no limit" (to lift a default)."""
    values = {}
    for name in LIMIT_NAMES:
        given = s.integer(name, 0, 0) if s.has(name) else None
        values[name] = getattr(defaults, name) if given is None else (given or None)
    return KeyLimits(**values)


def _parse_key_defaults(raw: object, problems: list[str]) -> KeyLimits:
    s = _Section(raw, "listen.key_defaults", problems)
    limits = _key_limits(s, KeyLimits())
    s.finish()
    return limits


def _parse_api_key(
    raw: object, key: str, problems: list[str], defaults: KeyLimits
) -> ApiKey | None:
    s = _Section(raw, key, problems)
    name = s.string("name", required=True)
    plain = s.string("key")
    digest_hex = s.string("sha256").lower()
    digest = b""
    if plain and digest_hex:
        s.problem("key", "give either key or sha256, not both")
    elif plain:
        if len(plain) < MIN_KEY_LENGTH:
            s.problem(
                "key",
                f"is shorter than {MIN_KEY_LENGTH} characters, which makes guessing it feasible;"
                " use `modelarts-gateway hash-key --generate` for a random key",
            )
        digest = hashlib.sha256(plain.encode()).digest()
    elif digest_hex:
        if not re.fullmatch(r"[0-9a-f]{64}", digest_hex):
            s.problem("sha256", "must be 64 hex digits (modelarts-gateway hash-key prints it)")
        else:
            digest = bytes.fromhex(digest_hex)
    else:
        s.problem("key", "is required (or sha256)")
    limits = _key_limits(s, defaults)
    models = _string_list(s, "models") if s.has("models") else None
    s.finish()
    if not name or not digest:
        return None
    return ApiKey(name, digest, limits.max_concurrency, models, limits)


def _parse_listen(raw: object, problems: list[str]) -> Listen:
    s = _Section(raw, "listen", problems)
    defaults = _parse_key_defaults(s.get("key_defaults"), problems)
    keys_raw = s.get("api_keys", [])
    keys: list[ApiKey] = []
    if not isinstance(keys_raw, list):
        s.problem("api_keys", "must be a list of {name, key} or {name, sha256}")
    else:
        for i, item in enumerate(keys_raw):
            parsed = _parse_api_key(item, f"listen.api_keys[{i}]", problems, defaults)
            if parsed is None:
                continue
            if any(k.name == parsed.name for k in keys):
                problems.append(f"listen.api_keys[{i}].name: duplicate key name {parsed.name!r}")
            if any(k.sha256 == parsed.sha256 for k in keys):
                problems.append(f"listen.api_keys[{i}]: the same key is listed twice")
            keys.append(parsed)
    allow_remote = _boolean(s, "allow_unauthenticated_remote")
    listen = Listen(
        host=s.string("host", "127.0.0.1") or "127.0.0.1",
        port=s.integer("port", 8080, 0, 65535),
        api_keys=tuple(keys),
        allowed_hosts=tuple(h.lower() for h in _string_list(s, "allowed_hosts")),
        allowed_origins=tuple(o.rstrip("/") for o in _string_list(s, "allowed_origins")),
        allow_unauthenticated_remote=allow_remote,
        shutdown_grace=s.convert("shutdown_grace", 30.0, parse_duration),
        header_timeout=s.convert("header_timeout", 30.0, parse_duration),
        trust_forwarded=_boolean(s, "trust_forwarded"),
        keepalive_timeout=s.convert("keepalive_timeout", 60.0, parse_duration),
        body_timeout=s.convert("body_timeout", 60.0, parse_duration),
        max_connections=s.integer("max_connections", 1024, 1),
        max_buffered_body=s.convert("max_buffered_body", 256 * 1024 * 1024, parse_size),
        max_header_bytes=s.convert("max_header_bytes", 64 * 1024, parse_size),
        backlog=s.integer("backlog", 1024, 1),
        reuse_port=_boolean(s, "reuse_port"),
        metrics_port=s.integer("metrics_port", 0, 1, 65535) if s.has("metrics_port") else None,
        key_defaults=defaults,
    )
    if listen.metrics_port is not None and listen.metrics_port == listen.port:
        s.problem("metrics_port", "must differ from listen.port")
    for name in ("keepalive_timeout", "body_timeout", "max_buffered_body", "max_header_bytes"):
        if s.has(name) and getattr(listen, name) <= 0:
            s.problem(name, "must be > 0")
    s.finish()
    return listen


def _boolean(s: _Section, name: str) -> bool:
    value = s.get(name, False)
    if not isinstance(value, bool):
        s.problem(name, "must be true or false")
        return False
    return value


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


def _refresh_margin(s: _Section) -> float:
    """``refresh_margin``: > 0, since the old token serves only while a refresh runs inside it
    (at 0 the refresh would start at expiry, and requests would wait for IAM)."""
    margin: float = s.convert("refresh_margin", 300.0, parse_duration)
    if margin <= 0:
        s.problem("refresh_margin", "must be > 0 (the old token serves while the refresh runs)")
        return 300.0
    return margin


def _parse_iam_password(s: _Section, name: str) -> CredentialConfig:
    scope = _iam_scope(s)
    margin = _refresh_margin(s)
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
        refresh_margin=_refresh_margin(s),
        region=scope.region,
        cache_file=_path(s, "cache_file"),
    )


def _parse_workload_identity(s: _Section, name: str) -> CredentialConfig:
    """Only names the file: it is read at every fetch (the kubelet rotates it), never here."""
    scope = _iam_scope(s)
    token_file = _path(s, "token_file")
    if token_file is None and not s.has("token_file"):
        s.problem("token_file", "is required (the projected service-account token's path)")
    idp_id = s.string("idp_id", required=True)
    if idp_id and not (idp_id.isprintable() and idp_id.isascii() and " " not in idp_id):
        s.problem("idp_id", "must be an identity provider name (no spaces or control characters)")
    return WorkloadIdentityCredential(
        name=name,
        iam_url=scope.iam_url,
        idp_id=idp_id,
        token_file=token_file or Path(),
        project=scope.project,
        project_id=scope.project_id,
        refresh_margin=_refresh_margin(s),
        region=scope.region,
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
    "workload_identity": _parse_workload_identity,
}


# --- temporary AK/SK from the platform (issue 12, item 2) ----------------------------------------
# These read the environment (once, here), so their parsers also get ``environ``.


def _env_url(s: _Section, name: str, text: str, variable: str) -> URL | None:
    """A URL from the environment, checked like a config URL; problems name the config key."""
    try:
        url = URL(text)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        s.problem(name, f"{variable} must be an http:// or https:// URL with a host")
        return None
    return url


def _parse_ecs_metadata(s: _Section, name: str) -> EcsMetadataCredential:
    url = _url(s, "metadata_url") if s.has("metadata_url") else DEFAULT_METADATA_URL
    return EcsMetadataCredential(
        name=name,
        metadata_url=url,
        refresh_margin=_refresh_margin(s),
    )


def _parse_pod_identity(s: _Section, name: str, environ: Mapping[str, str]) -> CredentialConfig:
    """``uri`` and ``token_file`` from the config, else the environment CCE sets in the pod."""
    if s.has("uri"):
        uri: URL | None = _url(s, "uri")
    elif environ.get(sdk_env.ENV_POD_URI):
        uri = _env_url(s, "uri", environ[sdk_env.ENV_POD_URI], sdk_env.ENV_POD_URI)
    else:
        uri = None
        s.problem("uri", f"is required (or set {sdk_env.ENV_POD_URI})")
    if s.has("token_file"):
        token_file = _path(s, "token_file")
    elif environ.get(sdk_env.ENV_POD_TOKEN_FILE):
        token_file = Path(environ[sdk_env.ENV_POD_TOKEN_FILE])
    else:
        token_file = None
        s.problem("token_file", f"is required (or set {sdk_env.ENV_POD_TOKEN_FILE})")
    return PodIdentityCredential(
        name=name,
        uri=uri or URL(),
        token_file=token_file or Path(),
        refresh_margin=_refresh_margin(s),
    )


def _parse_sdk_default(s: _Section, name: str, environ: Mapping[str, str]) -> CredentialConfig:
    """The SDK's chain, its environment read now: see gateway/config/sdk_env.py."""
    unsupported = sdk_env.unsupported_env(environ)
    if unsupported:
        s.problem("type", f"sdk_default: {unsupported}")
    metadata = _parse_ecs_metadata(s, name)
    pod = sdk_env.pod_identity_env(environ)
    pod_identity = None
    if pod is not None:
        uri = _env_url(s, "type", pod[0], sdk_env.ENV_POD_URI)
        if uri is not None:
            pod_identity = PodIdentityCredential(name, uri, pod[1], metadata.refresh_margin)
    return SdkDefaultCredential(
        name=name,
        env_keys=sdk_env.env_keys(environ),
        profile_file=sdk_env.profile_path(environ),
        metadata=metadata,
        pod_identity=pod_identity,
        refresh_margin=metadata.refresh_margin,
    )


ENVIRON_CREDENTIAL_TYPES: dict[
    str, Callable[[_Section, str, Mapping[str, str]], CredentialConfig]
] = {
    "pod_identity": _parse_pod_identity,
    "sdk_default": _parse_sdk_default,
}
CREDENTIAL_TYPES["ecs_metadata"] = _parse_ecs_metadata


def _credential_parsers(
    environ: Mapping[str, str],
) -> dict[str, Callable[[_Section, str], CredentialConfig]]:
    """Every type's parser; those that read the environment get ``environ`` bound."""
    bound = {
        kind: partial(_with_environ, f, environ) for kind, f in ENVIRON_CREDENTIAL_TYPES.items()
    }
    return {**CREDENTIAL_TYPES, **bound}


def _with_environ(
    parse: Callable[[_Section, str, Mapping[str, str]], CredentialConfig],
    environ: Mapping[str, str],
    s: _Section,
    name: str,
) -> CredentialConfig:
    return parse(s, name, environ)


def _parse_credentials(
    raw: object, problems: list[str], environ: Mapping[str, str]
) -> dict[str, CredentialConfig]:
    top = _Section(raw, "credentials", problems)
    result: dict[str, CredentialConfig] = {}
    parsers = _credential_parsers(environ)
    for name in list(top.raw):
        top.used.add(name)
        s = _Section(top.raw[name], top.sub(str(name)), problems)
        kind = s.string("type", required=True)
        parser = parsers.get(kind)
        if parser is None:
            if kind:
                s.problem("type", f"unknown type {kind!r} (one of: {', '.join(parsers)})")
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
        pool_idle=s.convert("pool_idle", d.pool_idle, parse_duration),
    )
    for name in ("connect", "first_byte", "pool_idle"):
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
    models, aliases = _models(s)
    route = Route(
        name=name,
        path=path,
        upstream=_url(s, "upstream"),
        credential=credential,
        models=models,
        aliases=aliases,
        include_usage=_boolean(s, "include_usage"),
        max_body=s.convert("max_body", 8 * 1024 * 1024, parse_size),
        max_concurrency=s.integer("max_concurrency", 64, 1),
        heartbeat=s.convert("heartbeat", 15.0, parse_duration),
        timeouts=_parse_timeouts(s.get("timeouts"), s.sub("timeouts"), problems),
        methods=_methods(s),
        default=_boolean(s, "default"),
    )
    s.finish()
    return route


def _models(s: _Section) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """``models``: plain names, or ``{name, upstream}`` for a public name the service knows by
    another; returns (public names, (public, upstream) pairs of the mapped entries)."""
    raw = s.get("models", [])
    if not isinstance(raw, list):
        s.problem("models", "must be a list of model names or {name, upstream} mappings")
        return (), ()
    names: list[str] = []
    aliases: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        key = f"{s.sub('models')}[{i}]"
        public = ""
        if isinstance(item, str) and item:
            public = item
        elif not isinstance(item, dict):
            s.problems.append(f"{key}: must be a model name or a mapping {{name, upstream}}")
        else:
            entry = _Section(item, key, s.problems)
            public = entry.string("name", required=True)
            upstream = entry.string("upstream", required=True)
            entry.finish()
            if public and upstream:
                aliases.append((public, upstream))
        if public in names:
            s.problems.append(f"{key}: model {public!r} is listed twice")
        elif public:
            names.append(public)
    return tuple(names), tuple(aliases)


DEFAULT_METHODS = ("GET", "HEAD", "POST")
# TRACE echoes the request back, credential included; CONNECT opens a tunnel.
NEVER_PROXIED = frozenset(("TRACE", "CONNECT"))


def _methods(s: _Section) -> tuple[str, ...]:
    if not s.has("methods"):
        return DEFAULT_METHODS
    given = _string_list(s, "methods")
    methods = tuple(dict.fromkeys(m.upper() for m in given))
    for m in methods:
        if not re.fullmatch(r"[A-Z]{1,20}", m):
            s.problem("methods", f"{m!r} is not an HTTP method")
        elif m in NEVER_PROXIED:
            s.problem("methods", f"{m} is never proxied (it would expose the credential)")
    if not methods:
        s.problem("methods", "must list at least one method")
    return methods or DEFAULT_METHODS


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
        defaults = [i for i in indexes if routes[i].default]
        if len(defaults) > 1:
            problems.append(
                f"routes[{defaults[1]}].default: routes[{defaults[0]}] is already the default "
                f"route on path {routes[defaults[0]].path!r}"
            )
        claimed: dict[str, int] = {}
        for i in indexes:
            for model in routes[i].models:
                if model in claimed and claimed[model] != i:
                    problems.append(
                        f"routes[{i}].models: model {model!r} is already served by "
                        f"routes[{claimed[model]}] on the same path"
                    )
                claimed[model] = i
    return routes


LIMITS_STORE_TYPES = ("memory", "redis")
ON_ERROR = ("allow", "deny")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _parse_limits_store(raw: object, problems: list[str]) -> LimitsStore:
    """``limits_store``: memory (one process) or a Redis that replicas share.

    Messages never quote the URL: it may hold the Redis password.
    """
    s = _Section(raw, "limits_store", problems)
    d = LimitsStore()
    kind = s.string("type", d.type) or d.type
    if kind not in LIMITS_STORE_TYPES:
        s.problem("type", f"unknown type {kind!r} (one of: {', '.join(LIMITS_STORE_TYPES)})")
    url = s.string("url")
    if kind == "redis":
        if not url:
            s.problem("url", "is required for type: redis (e.g. redis://redis:6379/0)")
        else:
            _check_redis_url(s, url)
        if importlib.util.find_spec("redis") is None:
            s.problem(
                "type",
                "redis needs the redis package: pip install 'modelarts-gateway[redis]'",
            )
    elif s.has("url"):
        s.problem("url", "applies only to type: redis")
    on_error = s.string("on_error", d.on_error)
    if on_error not in ON_ERROR:
        s.problem("on_error", f"must be one of: {', '.join(ON_ERROR)}")
    store = LimitsStore(
        type=kind,
        url=Secret(url) if url else None,
        key_prefix=s.string("key_prefix", d.key_prefix),
        on_error=on_error,
        timeout=s.convert("timeout", d.timeout, parse_duration),
    )
    if s.has("timeout") and store.timeout <= 0:
        s.problem("timeout", "must be > 0")
    s.finish()
    return store


def _check_redis_url(s: _Section, url: str) -> None:
    try:
        parsed = URL(url)
    except ValueError:
        s.problem("url", "not a valid URL")
        return
    if parsed.scheme not in REDIS_SCHEMES:
        s.problem("url", f"must be a {', '.join(x + '://' for x in REDIS_SCHEMES)} URL")
    elif parsed.scheme != "unix" and not parsed.host:
        s.problem("url", "must name a host")


def parse_settings(raw: object, environ: Mapping[str, str]) -> Settings:
    """Validate an already-parsed YAML document; raises :class:`ConfigError`."""
    problems: list[str] = []
    expanded = expand(raw, "", environ, problems)
    top = _Section(expanded, "", problems)
    listen = _parse_listen(top.get("listen"), problems)
    credentials = _parse_credentials(top.get("credentials"), problems, environ)
    routes = _parse_routes(top.get("routes"), credentials, problems)
    limits_store = _parse_limits_store(top.get("limits_store"), problems)
    config_watch = top.convert("config_watch", 0.0, parse_duration)
    top.finish()
    exposure = check_exposure(listen)
    if exposure:
        problems.append(exposure)
    if problems:
        raise ConfigError(problems)
    return Settings(
        listen=listen,
        credentials=credentials,
        routes=routes,
        limits_store=limits_store,
        config_watch=config_watch,
    )


def read_config(path: str | Path) -> str:
    """The config file's text, read by path each time (a ConfigMap update swaps a symlink)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None


def parse_config(text: str, path: str | Path, environ: Mapping[str, str]) -> Settings:
    """Parse, expand and validate config ``text`` read from ``path``; raises ConfigError."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}"]) from None
    return parse_settings(raw, environ)


def load_config(path: str | Path, environ: Mapping[str, str]) -> Settings:
    """Read, expand and validate a YAML config file; raises :class:`ConfigError`."""
    return parse_config(read_config(path), path, environ)
