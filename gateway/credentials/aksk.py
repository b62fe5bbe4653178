"""Credentials that sign each request: IAM access keys (``aksk``) and APIG apps (``app_aksk``).

The signature covers exactly what goes on the wire: the method, ``outgoing.url``'s raw path and
query (aiohttp sends ``url.raw_path_qs`` as is), the body bytes, and these headers with the values
sent. ``Host`` is set explicitly to what aiohttp would send (``host[:port]``, default port left
out, ``URL.host_port_subcomponent``), so the signed and the sent value cannot differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config.model import Secret
from gateway.credentials import signing
from gateway.credentials.base import Fixed, Outgoing
from gateway.errors import CredentialUnavailable

# Signed when the request carries them: what the API gateway reads to route and parse a request
# ("Are Request Header Parameters Required for Signing Requests?": any header may be left out of
# SignedHeaders except X-Sdk-Date; Host is signed by every SDK). Headers the gateway or a proxy
# may legitimately rewrite (X-Request-Id, Accept-Encoding, ...) stay unsigned.
OPTIONAL_SIGNED = ("Content-Type", "X-Security-Token")
# Headers a client must not be able to inject: they change how the signature is checked.
_DROP = ("Authorization", "X-Sdk-Date", "X-Sdk-Content-Sha256", "X-Security-Token")


class Signer(Fixed):
    """Signs every request with SDK-HMAC-SHA256; a 401 cannot be cured by signing again."""

    def __init__(
        self,
        name: str,
        key: str,
        secret: Secret,
        security_token: Secret | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._key = key
        self._secret = secret
        self._security_token = security_token
        self._clock = clock

    async def apply(self, outgoing: Outgoing) -> None:
        headers = outgoing.headers
        for header in _DROP:
            headers.popall(header, None)
        host = outgoing.url.host_port_subcomponent
        if not host:
            raise CredentialUnavailable(f"credential {self.name!r}: the upstream URL has no host")
        headers["Host"] = host
        headers["X-Sdk-Date"] = time.strftime(signing.DATE_FORMAT, time.gmtime(self._clock()))
        if self._security_token is not None:
            headers["X-Security-Token"] = self._security_token.reveal()
        signed = {"Host": host, "X-Sdk-Date": headers["X-Sdk-Date"]}
        for header in OPTIONAL_SIGNED:
            values = headers.getall(header, [])
            if values:
                headers[header] = values[0]  # one value: what is signed is what is sent
                signed[header] = values[0]
        headers["Authorization"] = signing.authorization(
            method=outgoing.method,
            raw_path=outgoing.url.raw_path,
            raw_query=outgoing.url.raw_query_string,
            headers=signed,
            body=outgoing.body,
            key=self._key,
            secret=self._secret.reveal(),
        )
