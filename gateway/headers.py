"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

from collections.abc import Mapping

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

# Response: hop-by-hop go, and aiohttp sets its own framing.
DROP_RESPONSE = HOP_BY_HOP | frozenset(("content-length", "date", "server"))


def _connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
    names: set[str] = set()
    for value in (
        headers.getall("Connection", [])
        if isinstance(headers, CIMultiDictProxy)
        else [headers.get("Connection", "")]
    ):
        names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


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
    extra = _connection_tokens(client)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        low = name.lower()
        if low in DROP_REQUEST or low in extra:
            continue
        out.add(name, value)
    for name, value in ABSENT_MEANS:
        if name not in out:
            out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop and framing headers."""
    extra = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        low = name.lower()
        if low in DROP_RESPONSE or low in extra:
            continue
        out.add(name, value)
    return out
