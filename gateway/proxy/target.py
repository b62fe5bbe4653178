"""The request target, checked once, and the upstream URL built from parsed parts.

The gateway's credential goes wherever this URL points, so it is never made by gluing client
text onto the upstream: its scheme, host and port are the route's own, its path starts with
the route's upstream path, and only an origin-form target (``/path?query``, RFC 9112 §3.2.1)
is proxied. Absolute-form (``http://evil/...``), authority-form and asterisk-form targets, and
any path an upstream or a hop could read differently from us, are refused (400 invalid_path).

One canonical path is routed on and forwarded: decoded once, it holds no encoded ``/``, ``\\``
or NUL, no ``%25`` (which a hop that decodes twice would turn into another escape), no invalid
UTF-8 (``%c0%ae``, an overlong ``.``), and no ``.`` or ``..`` segment, with or without a
``;parameter`` (Tomcat-style servers drop it before resolving dot segments).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, unquote_to_bytes

from yarl import URL

from gateway.errors import BadRequest

# A percent sign not followed by two hex digits is no escape at all.
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Escapes that change the path's structure once decoded: "/", "\", NUL, and "%" itself.
_STRUCTURAL = re.compile(r"%(?:2[fF]|5[cC]|00|25)")
# RFC 3986 pchar minus "%": what stays as is when the decoded path is encoded again.
_PCHAR_SAFE = "/:@!$&'()*+,;=-._~"
_DOTS = frozenset((".", ".."))


@dataclass(frozen=True, slots=True)
class Target:
    """An origin-form request target, checked."""

    path: str  # decoded once: what routing matches
    raw_path: str  # the same path, canonically percent-encoded: what goes upstream
    query: str  # as received (percent-encoded), without the "?"


def _invalid(why: str) -> BadRequest:
    return BadRequest(f"invalid request path: {why}", code="invalid_path")


def parse_target(raw: str) -> Target:
    """The checked target of a request (``request.raw_path``: the request line's target)."""
    if not raw.startswith("/"):
        raise _invalid("only origin-form targets (starting with '/') are accepted")
    if "#" in raw:
        raise _invalid("a request target has no fragment")
    raw_path, _, query = raw.partition("?")
    if "\\" in raw_path:
        raise _invalid("'\\' is not allowed")
    if _ESCAPE.search(raw_path):
        raise _invalid("'%' must start a two-digit escape")
    if _STRUCTURAL.search(raw_path):
        raise _invalid("encoded '/', '\\', NUL or '%' is not allowed")
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("escapes must decode to UTF-8") from None
    for segment in path.split("/"):
        if _is_dots(segment):
            raise _invalid("'.' and '..' segments are not allowed")
    return Target(path=path, raw_path=quote(path, safe=_PCHAR_SAFE), query=query)


# How many distinct query-less targets (and upstream URLs) a proxy remembers. A deployment
# sees a handful (/v1/chat/completions, /v1/models, ...); a client sending endless distinct
# paths only ever costs what parsing costs, since the memo starts over when full.
REMEMBERED = 256


class Targets:
    """:func:`parse_target`, remembered for targets without a query (a query can carry a
    client's key: never kept). Invalid targets raise every time and are never remembered."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, Target] = {}

    def __call__(self, raw: str) -> Target:
        target = self._seen.get(raw)
        if target is None:
            target = parse_target(raw)
            if not target.query and "?" not in raw:
                if len(self._seen) >= REMEMBERED:
                    self._seen.clear()
                self._seen[raw] = target
        return target


def _is_dots(segment: str) -> bool:
    """``.`` or ``..``, maybe with a ``;param``. Decoding a second time can add nothing: after
    one decode no ``%`` is left, since ``%25`` and stray ``%`` are refused."""
    return segment.split(";", 1)[0] in _DOTS


def without_keys(query: str, keys: frozenset[bytes]) -> str:
    """``query`` minus every parameter whose value is one of ``keys`` (digests of the
    gateway's API keys): a client's ``?api_key=`` never reaches the upstream."""
    if not query or not keys:
        return query
    kept = []
    for pair in query.split("&"):
        value = unquote_plus(pair.partition("=")[2])
        if hashlib.sha256(value.encode()).digest() not in keys:
            kept.append(pair)
    return "&".join(kept)


class UpstreamBase:
    """A route's upstream as parsed parts, to build each request's URL from."""

    __slots__ = ("_urls", "authority", "host", "path", "port", "scheme")

    def __init__(self, upstream: URL) -> None:
        self.scheme = upstream.scheme
        self.authority = upstream.raw_authority
        self.host = upstream.raw_host
        self.port = upstream.explicit_port
        self.path = upstream.raw_path.rstrip("/")
        self._urls: dict[str, URL] = {}  # by checked path, for targets without a query

    def url(self, target: Target) -> URL:
        """The route's scheme, host and port, its path, then the request's checked path."""
        if target.query:
            return self._build(target)
        url = self._urls.get(target.raw_path)
        if url is None:
            url = self._build(target)
            if len(self._urls) >= REMEMBERED:
                self._urls.clear()
            self._urls[target.raw_path] = url
        return url

    def _build(self, target: Target) -> URL:
        url = URL.build(
            scheme=self.scheme,
            authority=self.authority,
            path=self.path + target.raw_path,
            query_string=target.query,
            encoded=True,
        )
        # the checks above make this hold; a credential must never go anywhere else
        if url.raw_host != self.host or url.explicit_port != self.port:  # pragma: no cover
            raise _invalid("the upstream URL does not match the route")
        return url
