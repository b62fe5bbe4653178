"""Settings that work but expose the credential: warned about at start-up, not refused.

A plain-http IAM or upstream URL off this machine sends the password or token in clear text
to every hop on the way; ``allowed_origins: ["*"]`` lets any web page the user opens use the
gateway, and its credential, from the browser. Processes sharing a port (``reuse_port``) without
a shared ``cache_file`` each call IAM: more logins than needed, not a leak.
"""

from __future__ import annotations

import ipaddress

from yarl import URL

from gateway.config.model import AgencyCredential, IamPasswordCredential, Settings


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
    for i, route in enumerate(settings.routes):
        if _clear_text(route.upstream):
            risks.append(
                f"routes[{i}].upstream is plain http:// to another machine: the credential "
                "crosses the network unencrypted; use https://"
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
