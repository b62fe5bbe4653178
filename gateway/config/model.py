"""The settings as typed, frozen objects: what the rest of the gateway reads, never YAML."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from yarl import URL


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


@dataclass(frozen=True)
class Timeouts:
    """Per-phase upstream timeouts in seconds (0 = off for idle/total)."""

    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 1800.0
    pool_idle: float = 15.0  # an unused pooled upstream connection is closed after this long


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    upstream: URL
    credential: str
    models: tuple[str, ...] = ()  # the public names: routing, /v1/models, key allowlists
    # public name -> the name the service expects, for the entries given as {name, upstream}
    aliases: tuple[tuple[str, str], ...] = ()
    include_usage: bool = False  # ask streams for usage (stream_options), hide the answer's
    max_body: int = 8 * 1024 * 1024
    max_concurrency: int = 64
    heartbeat: float = 15.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    methods: tuple[str, ...] = ("GET", "HEAD", "POST")  # what is proxied; others get 405
    default: bool = False  # takes bodies without a "model" (or not JSON) on its path

    @cached_property
    def upstream_base(self) -> str:
        """``upstream`` as text without a trailing slash, for joining request paths per call."""
        return str(self.upstream).rstrip("/")

    @cached_property
    def upstream_models(self) -> dict[str, str]:
        """Public model name -> upstream name, only for aliases that really rename."""
        return {public: upstream for public, upstream in self.aliases if public != upstream}


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
class WorkloadIdentityCredential:
    """A Kubernetes service-account token (OIDC) exchanged for a project token (CCE workload
    identity): ``POST /v3.0/OS-AUTH/id-token/tokens`` with ``X-Idp-Id``."""

    name: str
    iam_url: URL
    idp_id: str  # the IAM identity provider registered for the cluster
    token_file: Path  # a projected service-account token, read at every fetch
    project: str | None
    project_id: str | None
    refresh_margin: float = 300.0
    region: str | None = None


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


# --- temporary AK/SK from the platform (issue 12, item 2) --------------------------------------
# The ECS/CCE metadata service: a link-local address every ECS server and CCE node answers on
# ("Obtaining Metadata"; huaweicloudsdkcore MetadataAccessor._METADATA_ENDPOINT).
DEFAULT_METADATA_URL = URL("http://169.254.169.254")


@dataclass(frozen=True)
class EcsMetadataCredential:
    """``type: ecs_metadata``: the agency bound to this ECS server or CCE node."""

    name: str
    metadata_url: URL = DEFAULT_METADATA_URL
    refresh_margin: float = 300.0


@dataclass(frozen=True)
class PodIdentityCredential:
    """``type: pod_identity``: CCE pod identity (its agent's URI and the pod's token file)."""

    name: str
    uri: URL
    token_file: Path  # read at every fetch: the kubelet rotates it
    refresh_margin: float = 300.0


@dataclass(frozen=True)
class StaticKeys:
    """AK/SK (and a security token) found in the environment or the SDK's profile file."""

    ak: str
    sk: Secret
    security_token: Secret | None = None


@dataclass(frozen=True)
class SdkDefaultCredential:
    """``type: sdk_default``: huaweicloudsdkcore's default chain, resolved at config load.

    The environment is read once, when the config is loaded: ``env_keys`` (HUAWEICLOUD_SDK_*),
    the profile file's path and pod identity's settings. The profile file and the services are
    consulted at the first fetch, in the SDK's order; the first that answers is kept.
    """

    name: str
    env_keys: StaticKeys | None
    profile_file: Path | None  # None: no HOME and no HUAWEICLOUD_SDK_CREDENTIALS_FILE
    metadata: EcsMetadataCredential
    pod_identity: PodIdentityCredential | None  # None: HC_CONTAINER_* not both set
    refresh_margin: float = 300.0


CredentialConfig = (
    IamPasswordCredential
    | StaticTokenCredential
    | TokenFileCredential
    | NoCredential
    | EcsMetadataCredential
    | PodIdentityCredential
    | SdkDefaultCredential
    | ApiKeyCredential
    | AppCodeCredential
    | AkSkCredential
    | AppAkSkCredential
    | AgencyCredential
    | WorkloadIdentityCredential
)
# Types whose credential yields an IAM token, so an agency may use it as ``via``.
TOKEN_CREDENTIAL_TYPES = ("iam_password", "agency", "token", "workload_identity")


LIMIT_NAMES = ("max_concurrency", "requests_per_minute", "tokens_per_minute", "tokens_per_day")


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may use (``listen.key_defaults`` or its own entry); None: no limit.

    Tokens are prompt plus completion; ``tokens_per_day`` is per UTC calendar day.
    """

    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None

    @property
    def counted(self) -> bool:
        """Some limit needs the limits store (everything but the in-process concurrency)."""
        return bool(self.requests_per_minute or self.tokens_per_minute or self.tokens_per_day)

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_day)


@dataclass(frozen=True)
class ApiKey:
    """A downstream client's key, kept only as its SHA-256 digest.

    ``limits`` are the effective ones: the entry's own over ``listen.key_defaults``.
    """

    name: str
    sha256: bytes = field(repr=False)
    max_concurrency: int | None = None
    models: tuple[str, ...] | None = None  # None: every model
    limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True)
class LimitsStore:
    """Where per-key counts live: this process (``memory``) or a Redis shared by replicas."""

    type: str = "memory"  # memory | redis
    url: Secret | None = None  # redis://[:password@]host:port/db (may hold a password)
    key_prefix: str = "mag:"
    on_error: str = "allow"  # Redis unreachable: allow, or deny (503 limits_unavailable)
    timeout: float = 0.25  # connect and read timeout per Redis call


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
    trust_forwarded: bool = False  # relay client-sent Forwarded / X-Forwarded-* / Via
    keepalive_timeout: float = 60.0  # idle time allowed between requests on a connection
    body_timeout: float = 60.0  # a request body must arrive within this (408)
    max_connections: int = 1024  # beyond it new connections are closed at once
    max_buffered_body: int = 256 * 1024 * 1024  # request bytes held at once, all requests (503)
    max_header_bytes: int = 64 * 1024  # a request's header lines in total (431)
    backlog: int = 1024  # listen(2) queue: a burst beyond it waits for a SYN retransmit (1 s)
    # SO_REUSEPORT: several gateway processes (of this user) share one port, the kernel spreads
    # new connections over them (--workers N, or the systemd template unit)
    reuse_port: bool = False
    # Each process also serves /metrics, /healthz and /readyz on metrics_port + its worker index:
    # on a shared port a scrape reaches whichever process the kernel picks.
    metrics_port: int | None = None
    key_defaults: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True)
class Settings:
    listen: Listen
    credentials: Mapping[str, CredentialConfig]
    routes: tuple[Route, ...]
    limits_store: LimitsStore = field(default_factory=LimitsStore)
    config_watch: float = 0.0  # re-read the file when its content changes, this often (0: off)
