"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

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
    for h in ("Authorization", "X-Auth-Token", "X-Apig-AppCode", "Cookie", "X-Security-Token")
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


def _without(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """``headers`` minus ``drop`` and minus every header named in Connection (RFC 9110 §7.6.1)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in drop and low not in named:
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


def upstream_request_headers(client: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers minus credentials, hop-by-hop and framing headers."""
    out = _without(client, DROP_REQUEST)
    for name, value in ABSENT_MEANS:
        if name not in out:
            out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop and framing headers."""
    return _without(upstream, DROP_RESPONSE)
