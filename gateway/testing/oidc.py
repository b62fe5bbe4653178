"""A stand-in for a Kubernetes cluster's service-account token issuer, as IAM sees it.

CCE workload identity ("Workload Identities", CCE best practices): the cluster's API server
signs projected service-account tokens (JWTs, RFC 7519) and the account registers the cluster
in IAM as an OpenID Connect identity provider with programmatic access: the issuer URL
(``https://kubernetes.default.svc.cluster.local``), a client ID (the ``audience`` of the
projected token) and the cluster's signing keys (``kubectl get --raw /openid/v1/jwks``);
identity conversion rules map a token's ``sub`` (``system:serviceaccount:<ns>:<name>``) to a
user group.

Real clusters sign with RS256; this stand-in signs with HS256 so it needs nothing beyond the
standard library. What IAM checks is the same: signature, issuer, audience, expiry, subject.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidIdToken(Exception):
    """The id token does not authenticate; the message says why (it never holds the token)."""


@dataclass
class OidcProvider:
    """An IAM identity provider of protocol OpenID Connect, for one cluster's tokens."""

    idp_id: str = "cce-oidc"
    issuer: str = CLUSTER_ISSUER
    client_id: str = "modelarts-gateway"
    # identity conversion rules: the service accounts mapped to ``group``
    subjects: tuple[str, ...] = ("system:serviceaccount:default:modelarts-gateway",)
    group: str = "modelarts-users"
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    key_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def mint(
        self,
        sub: str | None = None,
        *,
        lifetime: float = 3600.0,
        audience: str | None = None,
        issuer: str | None = None,
        key: bytes | None = None,
    ) -> str:
        """A projected service-account token as the kubelet writes it (claims per Kubernetes)."""
        now = int(time.time())
        subject = sub or self.subjects[0]
        namespace, _, account = subject.removeprefix("system:serviceaccount:").partition(":")
        claims: dict[str, Any] = {
            "aud": [audience or self.client_id],
            "exp": now + int(lifetime),
            "iat": now,
            "iss": issuer or self.issuer,
            "jti": secrets.token_hex(16),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": "app-0", "uid": secrets.token_hex(16)},
                "serviceaccount": {"name": account, "uid": secrets.token_hex(16)},
            },
            "nbf": now,
            "sub": subject,
        }
        header = {"alg": "HS256", "kid": self.key_id, "typ": "JWT"}
        signing_input = (
            _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        ).encode("ascii")
        sig = hmac.new(key or self.key, signing_input, hashlib.sha256).digest()
        return signing_input.decode("ascii") + "." + _b64(sig)

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token this provider accepts; InvalidIdToken otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidIdToken("the id token is not a JWT")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            sig = _unb64(parts[2])
        except ValueError:
            raise InvalidIdToken("the id token is not a JWT") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise InvalidIdToken("the id token is not a JWT")
        if header.get("alg") != "HS256" or header.get("kid") != self.key_id:
            raise InvalidIdToken("the id token is not signed by a key of this identity provider")
        expected = hmac.new(
            self.key, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(sig, expected):
            raise InvalidIdToken("the id token's signature does not verify")
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int | float) or now >= exp:
            raise InvalidIdToken("the id token has expired")
        if isinstance(nbf, int | float) and now < nbf:
            raise InvalidIdToken("the id token is not valid yet")
        if claims.get("iss") != self.issuer:
            raise InvalidIdToken("the id token's issuer does not match the identity provider")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.client_id not in audiences:
            raise InvalidIdToken("the id token's audience does not match the client ID")
        if claims.get("sub") not in self.subjects:
            raise InvalidIdToken("no identity conversion rule matches the id token's subject")
        return claims
