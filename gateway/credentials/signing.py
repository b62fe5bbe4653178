"""``SDK-HMAC-SHA256`` request signing, as Huawei Cloud's API Gateway (APIG) verifies it.

Sources: "API Request Signing Guide", chapter "AK/SK Signing and Authentication Algorithm"
(support.huaweicloud.com/devg-apisign/api-sign-algorithm-002..005), and the APIG signing SDK for
Python (``apig_sdk/signer.py``), whose encoding rules are followed exactly::

    CanonicalRequest = Method \\n CanonicalURI \\n CanonicalQueryString \\n
                       CanonicalHeaders \\n SignedHeaders \\n HexEncode(SHA256(body))
    StringToSign     = "SDK-HMAC-SHA256" \\n X-Sdk-Date \\n HexEncode(SHA256(CanonicalRequest))
    Signature        = HexEncode(HMAC-SHA256(secret, StringToSign))
    Authorization    = SDK-HMAC-SHA256 Access=<key>, SignedHeaders=<a;b;c>, Signature=<hex>

- URI and query: every byte except the RFC 3986 unreserved characters (``A-Z a-z 0-9 - _ . ~``)
  becomes ``%XY`` (upper-case hex, UTF-8): the SDK's ``quote(s, safe='~')``.
- CanonicalURI: the path is percent-decoded, split on ``/``, each segment encoded again, and a
  ``/`` appended when it does not end with one ("the URI must end with / when signing; a request
  need not").
- CanonicalQueryString: ``name=value`` pairs split on ``&`` and the first ``=``, decoded
  (``+`` stays ``+``), empty names dropped, sorted by name then value, encoded, joined with
  ``&``; an empty value keeps its ``=`` ("parm1=value1&parm2=").
- CanonicalHeaders: ``lower-case-name:trimmed value\\n`` for each signed header, sorted by name;
  SignedHeaders: the same names joined with ``;``.

This module is pure (no I/O, no clock): callers pass the ``X-Sdk-Date`` they send.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote, unquote

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"  # X-Sdk-Date: ISO 8601 basic format, UTC


def uri_encode(text: str) -> str:
    """Percent-encode all but the RFC 3986 unreserved characters, as the APIG SDKs do."""
    return quote(text, safe="~")


def canonical_uri(raw_path: str) -> str:
    """The path as signed: decoded, each segment re-encoded, always ending with ``/``."""
    path = "/".join(uri_encode(segment) for segment in unquote(raw_path).split("/"))
    return path if path.endswith("/") else path + "/"


def canonical_query(raw_query: str) -> str:
    """The query as signed: decoded pairs sorted by name, then value; re-encoded."""
    params: dict[str, list[str]] = {}
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        if name:
            params.setdefault(unquote(name), []).append(unquote(value))
    return "&".join(
        f"{uri_encode(name)}={uri_encode(value)}"
        for name in sorted(params)
        for value in sorted(params[name])
    )


def canonical_request(
    method: str, raw_path: str, raw_query: str, headers: Mapping[str, str], body: bytes
) -> tuple[str, str]:
    """(CanonicalRequest, SignedHeaders) for a request; every header in ``headers`` is signed."""
    lowered = {name.lower(): value.strip() for name, value in headers.items()}
    names = sorted(lowered)
    signed_headers = ";".join(names)
    canonical_headers = "".join(f"{name}:{lowered[name]}\n" for name in names)
    text = "\n".join(
        (
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers,
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        )
    )
    return text, signed_headers


def string_to_sign(canonical: str, sdk_date: str) -> str:
    """The algorithm, the request time and the hash of the canonical request, one per line."""
    return f"{ALGORITHM}\n{sdk_date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


def signature(secret: str, to_sign: str) -> str:
    """Hex HMAC-SHA256 of the string to sign, keyed with the secret (SK or AppSecret)."""
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    body: bytes,
    key: str,
    secret: str,
) -> str:
    """The ``Authorization`` value for a request whose ``headers`` (all signed) hold X-Sdk-Date.

    ``headers`` must include ``Host`` and ``X-Sdk-Date`` with exactly the values that are sent.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    sdk_date = lowered.get("x-sdk-date", "").strip()
    if not sdk_date or "host" not in lowered:
        raise ValueError("the signed headers must include Host and X-Sdk-Date")
    canonical, signed_headers = canonical_request(method, raw_path, raw_query, headers, body)
    sig = signature(secret, string_to_sign(canonical, sdk_date))
    return f"{ALGORITHM} Access={key}, SignedHeaders={signed_headers}, Signature={sig}"
