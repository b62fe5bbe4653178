"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

import hashlib

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies strip.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Client credentials never travel upstream: the gateway's own credential is the only one.
CLIENT_CREDENTIALS = frozenset(
    h.lower()
    for h in (
        "Authorization",
        "X-Auth-Token",
        "X-Apig-AppCode",
        "Cookie",
        "X-Security-Token",
        "Api-Key",
        "X-Api-Key",
    )
)
# Recomputed by the client library for the outgoing request.
RECOMPUTED = frozenset(("host", "content-length", "expect"))
DROP_REQUEST = HOP_BY_HOP | CLIENT_CREDENTIALS | RECOMPUTED

# Response: hop-by-hop go, and aiohttp sets its own framing. Credentials an upstream (or a
# hop that echoes requests) may send back never reach the client: they are the gateway's.
RESPONSE_CREDENTIALS = frozenset(
    h.lower()
    for h in (
        "X-Auth-Token",
        "X-Subject-Token",
        "X-Security-Token",
        "Authorization",
        "Proxy-Authorization",
        "Set-Cookie",
        "Set-Cookie2",
    )
)
DROP_RESPONSE = HOP_BY_HOP | RESPONSE_CREDENTIALS | frozenset(("content-length", "date", "server"))


# What a hop says about the client: any client could claim to be one (listen.trust_forwarded).
FORWARDING = frozenset(("forwarded", "via", "x-real-ip"))


def _without(
    headers: CIMultiDictProxy[str], drop: frozenset[str], *, forwarding: bool = False
) -> CIMultiDict[str]:
    """``headers`` minus ``drop`` and minus every header named in Connection (RFC 9110 §7.6.1);
    with ``forwarding``, minus the forwarding headers too (in the same pass)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in drop or low in named:
            continue
        if forwarding and (low in FORWARDING or low.startswith("x-forwarded-")):
            continue
        out.add(name, value)
    return out


# What the client library would add where the client sent nothing. aiohttp adds
# `Accept-Encoding: gzip, deflate`, which would get the client a body it did not ask to be
# compressed; these say what an absent header means (RFC 9110 §12.5.1, §12.5.3), and name the
# gateway as the user agent. Setting them is cheaper than aiohttp's skip_auto_headers.
ABSENT_MEANS = (
    ("Accept", "*/*"),
    ("Accept-Encoding", "identity"),
    ("User-Agent", "modelarts-gateway"),
)


def holds_key(value: str, keys: frozenset[bytes]) -> bool:
    """True when ``value``, or its part after an auth scheme, is one of the gateway's keys."""
    if hashlib.sha256(value.strip().encode()).digest() in keys:
        return True
    _, _, rest = value.partition(" ")
    return bool(rest) and hashlib.sha256(rest.strip().encode()).digest() in keys


def upstream_request_headers(
    client: CIMultiDictProxy[str],
    *,
    trust_forwarded: bool = True,
    keys: frozenset[bytes] = frozenset(),
) -> CIMultiDict[str]:
    """The client's headers minus credentials, hop-by-hop and framing headers; minus
    forwarding headers unless trusted; minus any header holding one of ``keys`` (the digests
    of ``listen.api_keys``), whatever its name."""
    out = _without(client, DROP_REQUEST, forwarding=not trust_forwarded)
    if keys:
        for name in list(out.keys()):
            if any(holds_key(v, keys) for v in out.getall(name)):
                out.popall(name, None)
    for name, value in ABSENT_MEANS:
        if name not in out:
            out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop and framing headers."""
    return _without(upstream, DROP_RESPONSE)
