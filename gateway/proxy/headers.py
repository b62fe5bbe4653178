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


# What a header name is to a filter, decided once per spelling (clients and upstreams send the
# same few spellings on every request; lower-casing each name and testing it against the sets
# costs more than the rest of the filter). Bounded: names are the peer's choice.
_KEEP, _DROP, _FORWARDING, _CONNECTION = 0, 1, 2, 3
_FATES_KEPT = 4096


class _Fates:
    """Each header name spelling's fate under one direction's ``drop`` set."""

    __slots__ = ("_drop", "seen")

    def __init__(self, drop: frozenset[str]) -> None:
        self._drop = drop
        self.seen: dict[str, int] = {}  # read by the filter itself: a call per name costs

    def learn(self, name: str) -> int:
        low = name.lower()
        if low == "connection":
            fate = _CONNECTION
        elif low in self._drop:
            fate = _DROP
        elif low in FORWARDING or low.startswith("x-forwarded-"):
            fate = _FORWARDING
        else:
            fate = _KEEP
        if len(self.seen) >= _FATES_KEPT:
            self.seen.clear()
        self.seen[name] = fate
        return fate


def _without(
    headers: CIMultiDictProxy[str], fates: _Fates, *, forwarding: bool = False
) -> CIMultiDict[str]:
    """``headers`` minus ``fates``' drop set and minus every header named in Connection (RFC
    9110 §7.6.1); with ``forwarding``, minus the forwarding headers too (in the same pass)."""
    kept: list[tuple[str, str]] = []
    connection: list[str] | None = None
    seen = fates.seen
    for name, value in headers.items():
        fate = seen.get(name)
        if fate is None:
            fate = fates.learn(name)
        if fate == _KEEP or (fate == _FORWARDING and not forwarding):
            kept.append((name, value))
        elif fate == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(value)
    if connection is not None:
        named = {token.strip().lower() for value in connection for token in value.split(",")}
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return CIMultiDict(kept)


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
    out = _without(client, _REQUEST_FATES, forwarding=not trust_forwarded)
    if keys:
        for name in list(out.keys()):
            if any(holds_key(v, keys) for v in out.getall(name, ())):  # gone with a twin
                out.popall(name, None)
    for name, value in ABSENT_MEANS:
        if name not in out:
            out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop and framing headers."""
    return _without(upstream, _RESPONSE_FATES)


_REQUEST_FATES = _Fates(DROP_REQUEST)
_RESPONSE_FATES = _Fates(DROP_RESPONSE)
