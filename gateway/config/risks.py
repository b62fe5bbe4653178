"""Settings that work but expose the credential: warned about at start-up, not refused.

A plain-http IAM or upstream URL off this machine sends the password or token in clear text
to every hop on the way; ``allowed_origins: ["*"]`` lets any web page the user opens use the
gateway, and its credential, from the browser. Processes sharing a port (``reuse_port``) without
a shared ``cache_file`` each call IAM: more logins than needed, not a leak.
"""

from __future__ import annotations

import ipaddress

from yarl import URL

from gateway.config.model import (
    AgencyCredential,
    EcsMetadataCredential,
    IamPasswordCredential,
    PodIdentityCredential,
    SdkDefaultCredential,
    Settings,
)


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _clear_text(url: URL) -> bool:
    return url.scheme == "http" and not _loopback(url.host)


def _link_local(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_link_local
    except ValueError:
        return False


def _key_service_urls(name: str, config: object) -> list[tuple[str, URL]]:
    """The URLs temporary AK/SK come from: (dotted key, URL)."""
    key = f"credentials.{name}"
    if isinstance(config, EcsMetadataCredential):
        return [(f"{key}.metadata_url", config.metadata_url)]
    if isinstance(config, PodIdentityCredential):
        return [(f"{key}.uri", config.uri)]
    if isinstance(config, SdkDefaultCredential):
        urls = [(f"{key}.metadata_url", config.metadata.metadata_url)]
        if config.pod_identity is not None:
            urls.append((f"{key} (HC_CONTAINER_CREDENTIALS_FULL_URI)", config.pod_identity.uri))
        return urls
    return []


def start_up_risks(settings: Settings) -> list[str]:
    """One sentence per risky setting, naming its key."""
    risks = []
    for name, config in settings.credentials.items():
        iam = getattr(config, "iam_url", None)
        if isinstance(iam, URL) and _clear_text(iam):
            risks.append(
                f"credentials.{name}.iam_url is plain http:// to another machine: the password "
                "and token cross the network unencrypted; use https://"
            )
        for key, url in _key_service_urls(name, config):
            # the metadata service (169.254.169.254) is link-local: its answers never leave the
            # host; a credential service elsewhere over http would hand out keys in clear text
            if _clear_text(url) and not _link_local(url.host):
                risks.append(
                    f"{key} is plain http:// to another machine: temporary AK/SK cross the "
                    "network unencrypted; use https:// or a link-local address"
                )
    for i, route in enumerate(settings.routes):
        if _clear_text(route.upstream):
            risks.append(
                f"routes[{i}].upstream is plain http:// to another machine: the credential "
                "crosses the network unencrypted; use https://"
            )
    if settings.listen.reuse_port and settings.limits_store.type == "memory":
        counted = [k.name for k in settings.listen.api_keys if k.limits.counted]
        if counted:
            risks.append(
                "listen.reuse_port is on and limits_store.type is memory: each process sharing "
                f"the port counts the per-key limits of {', '.join(map(repr, counted))} alone, "
                "so N processes admit up to N times each limit; use limits_store.type: redis"
            )
    if settings.listen.reuse_port:
        for name, config in settings.credentials.items():
            if (
                isinstance(config, IamPasswordCredential | AgencyCredential)
                and not config.cache_file
            ):
                risks.append(
                    f"listen.reuse_port is on and credentials.{name} has no cache_file: each "
                    "process sharing the port fetches its own token from IAM; give it a "
                    "cache_file the processes share"
                )
    if "*" in settings.listen.allowed_origins:
        risks.append(
            'listen.allowed_origins is ["*"]: any web page open in a browser that can reach the '
            "gateway may use it; list the origins that need it instead"
        )
    return risks
