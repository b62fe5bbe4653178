"""Where huaweicloudsdkcore looks for credentials: its environment variables and profile file.

``type: sdk_default`` follows the SDK's default chain (``CredentialProviderChain`` in
``huaweicloudsdkcore/auth/provider.py``, 3.1.219), so a machine that already has the SDK
configured needs no credential in the gateway's config. These functions reproduce the SDK's
``EnvCredentialProvider`` and ``ProfileCredentialProvider`` lookups exactly (the tests run both
on the same inputs); the environment is read once, when the config is loaded.

Where the SDK would authenticate in a way the gateway does not implement (its federated
``idp_id`` + ``id_token_file`` login, or its OIDC STS provider), the lookup says so instead of
silently choosing another identity than the SDK would.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from pathlib import Path

from gateway.config.model import Secret, StaticKeys

ENV_AK = "HUAWEICLOUD_SDK_AK"
ENV_SK = "HUAWEICLOUD_SDK_SK"
ENV_SECURITY_TOKEN = "HUAWEICLOUD_SDK_SECURITY_TOKEN"
ENV_IDP_ID = "HUAWEICLOUD_SDK_IDP_ID"
ENV_ID_TOKEN_FILE = "HUAWEICLOUD_SDK_ID_TOKEN_FILE"
ENV_CREDENTIALS_FILE = "HUAWEICLOUD_SDK_CREDENTIALS_FILE"
DEFAULT_PROFILE = (".huaweicloud", "credentials")  # under $HOME
PROFILE_SECTION = "basic"  # the SDK's BasicCredentials (project-scoped services, ModelArts)
# CCE pod identity: the SDK's PodIdentityCredentialProvider reads both.
ENV_POD_URI = "HC_CONTAINER_CREDENTIALS_FULL_URI"
ENV_POD_TOKEN_FILE = "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE"
# The SDK's OidcStsCredentialProvider, first in its chain since 3.1.1xx: it applies when these
# are set (and an id token or its file).
ENV_OIDC_PROVIDER_URN = "HUAWEICLOUD_OIDC_PROVIDER_URN"
ENV_OIDC_AGENCY_URN = "HUAWEICLOUD_OIDC_AGENCY_URN"
ENV_OIDC_ID_TOKEN = "HUAWEICLOUD_OIDC_ID_TOKEN"
ENV_OIDC_TOKEN_FILE = "HUAWEICLOUD_OIDC_TOKEN_FILE"
MAX_PROFILE = 64 * 1024


class UnsupportedSource(Exception):
    """The SDK would use this source in a way the gateway cannot; the message names no value."""


def unsupported_env(environ: Mapping[str, str]) -> str | None:
    """Why the SDK's chain would pick a login the gateway lacks, from the environment, or None."""
    get = environ.get
    if (
        get(ENV_OIDC_PROVIDER_URN)
        and get(ENV_OIDC_AGENCY_URN)
        and (get(ENV_OIDC_ID_TOKEN) or get(ENV_OIDC_TOKEN_FILE))
    ):
        return (
            f"{ENV_OIDC_PROVIDER_URN} and {ENV_OIDC_AGENCY_URN} select the SDK's OIDC STS login, "
            "which sdk_default does not implement; unset them or use another credential type"
        )
    if get(ENV_IDP_ID) and get(ENV_ID_TOKEN_FILE):
        return (
            f"{ENV_IDP_ID} and {ENV_ID_TOKEN_FILE} select the SDK's federated login, which "
            "sdk_default does not implement; use type: workload_identity"
        )
    return None


def env_keys(environ: Mapping[str, str]) -> StaticKeys | None:
    """The SDK's EnvCredentialProvider: AK and SK both non-empty, else None (next source)."""
    ak, sk = environ.get(ENV_AK), environ.get(ENV_SK)
    if not ak or not sk:
        return None
    token = environ.get(ENV_SECURITY_TOKEN)
    return StaticKeys(ak, Secret(sk), Secret(token) if token else None)


def profile_path(environ: Mapping[str, str]) -> Path | None:
    """``$HUAWEICLOUD_SDK_CREDENTIALS_FILE``, else ``$HOME/.huaweicloud/credentials``."""
    given = environ.get(ENV_CREDENTIALS_FILE)
    if given:
        return Path(given)
    home = environ.get("HOME")
    return Path(home, *DEFAULT_PROFILE) if home else None


def pod_identity_env(environ: Mapping[str, str]) -> tuple[str, Path] | None:
    """Pod identity's URI and token file when both are set (the SDK needs both), else None."""
    uri, token_file = environ.get(ENV_POD_URI), environ.get(ENV_POD_TOKEN_FILE)
    if not uri or not token_file:
        return None
    return uri, Path(token_file)


def read_profile(path: Path) -> StaticKeys | None:
    """The SDK's ProfileCredentialProvider on ``path``: its ``[basic]`` ak/sk, else None.

    None (the SDK moves on): no such file, no ``[basic]`` section, ak or sk missing or empty.
    :class:`UnsupportedSource` (the SDK would stop or log in otherwise): not an INI file the
    SDK's ``configparser.ConfigParser()`` reads, or ``idp_id`` + ``id_token_file`` (federated).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE + 1)
    except OSError:
        return None  # the SDK's parser.read() skips a file it cannot open: the next source
    if len(data) > MAX_PROFILE:
        raise UnsupportedSource(f"the profile file {path} is too large for a credentials file")
    # The SDK's own parser, with its defaults (interpolation, DEFAULT section, lower-cased keys)
    parser = configparser.ConfigParser()
    try:
        parser.read_string(data.decode("utf-8"), source=str(path))
        if not parser.has_section(PROFILE_SECTION):
            return None
        profile = dict(parser.items(PROFILE_SECTION))
    except (UnicodeDecodeError, configparser.Error) as exc:
        # never str(exc): configparser quotes the offending line, which may hold a key
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if isinstance(line, int) else ""
        kind = type(exc).__name__
        raise UnsupportedSource(
            f"the profile file {path} is not an INI file the SDK reads{where}: {kind}"
        ) from None
    if profile.get("idp_id") and profile.get("id_token_file"):
        raise UnsupportedSource(
            f"the profile file {path} selects the SDK's federated login (idp_id, id_token_file), "
            "which sdk_default does not implement; use type: workload_identity"
        )
    ak, sk = profile.get("ak"), profile.get("sk")
    if not ak or not sk:
        return None
    token = profile.get("security_token")
    return StaticKeys(ak, Secret(sk), Secret(token) if token else None)
