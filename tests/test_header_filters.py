"""The header filters, with each name's fate remembered, give what the plain filter gave.

The reference below is the filter the gateway used before (every name lower-cased and tested
against the sets, then the key check and the absent-means defaults); random header lists, with
the spellings, duplicates and Connection tokens a hostile client or upstream would send, must
come out identical from both, in the same order, in both directions.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.proxy import headers as headers_module
from gateway.proxy.headers import (
    ABSENT_MEANS,
    DROP_REQUEST,
    DROP_RESPONSE,
    FORWARDING,
    client_response_headers,
    holds_key,
    upstream_request_headers,
)

KEY = "gw-key-0123456789abcdefghij"
KEYS = frozenset({hashlib.sha256(KEY.encode()).digest()})


def reference(
    headers: CIMultiDictProxy[str],
    trust_forwarded: bool,
    keys: frozenset[bytes],
    drop: frozenset[str] = DROP_REQUEST,
    absent: bool = True,
) -> CIMultiDict[str]:
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
        if not trust_forwarded and (low in FORWARDING or low.startswith("x-forwarded-")):
            continue
        out.add(name, value)
    if keys:
        for name in list(out.keys()):
            if any(holds_key(v, keys) for v in out.getall(name, ())):
                out.popall(name, None)
    for name, value in ABSENT_MEANS if absent else ():
        if name not in out:
            out[name] = value
    return out


NAMES = [
    "Host", "host", "HOST", "Origin", "origin", "Sec-Fetch-Site", "Authorization",
    "X-Request-Id", "x-request-id", "Expect", "Connection", "connection", "Keep-Alive",
    "X-Forwarded-For", "x-forwarded-proto", "X-Forwarded-Host", "Forwarded", "Via", "X-Real-IP",
    "Accept", "accept", "Accept-Encoding", "User-Agent", "user-agent", "X-Custom", "x-custom",
    "Cookie", "Api-Key", "X-Api-Key", "TE", "Trailer", "Upgrade", "Content-Length",
    "Content-Type", "Proxy-Authorization", "X-Auth-Token", "X-Stainless-Lang", "Transfer-Encoding",
]  # fmt: skip
VALUES = [
    "a", "", " ", "close", "keep-alive", "x-custom", "X-Custom, Accept", "user-agent ,te",
    "accept-encoding", "application/json", "cross-site", "same-origin", "100-continue",
    f"Bearer {KEY}", KEY, f" {KEY} ", "Bearer other-key-value-123456789", "127.0.0.1:8080",
    "https://app.example", "x-stainless-lang, via",
]  # fmt: skip


@pytest.mark.parametrize("seed", range(300))
def test_random_headers_come_out_as_the_plain_filter_gave_them(seed: int) -> None:
    rng = random.Random(seed)
    pairs = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randrange(0, 14))]
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    for trust in (True, False):
        for keys in (frozenset(), KEYS):
            ours = upstream_request_headers(headers, trust_forwarded=trust, keys=keys)
            expected = reference(headers, trust, keys)
            assert list(ours.items()) == list(expected.items()), (pairs, trust, bool(keys))
    response = reference(headers, True, frozenset(), DROP_RESPONSE, absent=False)
    assert list(client_response_headers(headers).items()) == list(response.items()), pairs


def test_the_remembered_spellings_stay_bounded() -> None:
    fates = headers_module._REQUEST_FATES
    for i in range(headers_module._FATES_KEPT + 10):
        upstream_request_headers(CIMultiDictProxy(CIMultiDict([(f"X-H{i}", "v")])))
    assert len(fates.seen) <= headers_module._FATES_KEPT


def test_a_name_sent_twice_in_two_spellings_with_keys_configured_is_not_a_500() -> None:
    """The key check walked the names and read each one's values; a name's twin in another
    case had gone with it, and multidict 6 raises KeyError for a name it no longer holds."""
    headers = CIMultiDictProxy(CIMultiDict([("X-Custom", KEY), ("x-custom", "b"), ("Y", "c")]))
    out = upstream_request_headers(headers, keys=KEYS)
    assert "X-Custom" not in out and out["Y"] == "c"  # the name holding a key goes, both spellings
