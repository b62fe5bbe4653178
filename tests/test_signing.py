"""SDK-HMAC-SHA256: the published test vector and the APIG SDK's encoding rules."""

from __future__ import annotations

import calendar
import hashlib

import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.config.model import Secret
from gateway.credentials import Outgoing
from gateway.credentials.aksk import Signer
from gateway.credentials.signing import (
    authorization,
    canonical_query,
    canonical_request,
    canonical_uri,
)

# "API Request Signing Guide", AK/SK Signing and Authentication Algorithm: the VPC query example.
VECTOR_PATH = "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs"
VECTOR_QUERY = "limit=2&marker=13551d6b-755d-4757-b956-536f674975c0"
VECTOR_HEADERS = {
    "Host": "service.region.example.com",
    "Content-Type": "application/json",
    "X-Sdk-Date": "20191115T033655Z",
}
VECTOR_AK = "QTWAOYTTINDUT2QVKYUC"
VECTOR_SK = "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
VECTOR_SIGNATURE = "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"


def test_published_vector_gives_the_published_signature() -> None:
    value = authorization(
        method="GET",
        raw_path=VECTOR_PATH,
        raw_query=VECTOR_QUERY,
        headers=VECTOR_HEADERS,
        body=b"",
        key=VECTOR_AK,
        secret=VECTOR_SK,
    )
    assert value == (
        f"SDK-HMAC-SHA256 Access={VECTOR_AK}, SignedHeaders=content-type;host;x-sdk-date, "
        f"Signature={VECTOR_SIGNATURE}"
    )


def test_published_vector_canonical_request_matches_the_guide() -> None:
    canonical, signed = canonical_request("GET", VECTOR_PATH, VECTOR_QUERY, VECTOR_HEADERS, b"")
    assert signed == "content-type;host;x-sdk-date"
    assert canonical == (
        "GET\n"
        "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs/\n"
        "limit=2&marker=13551d6b-755d-4757-b956-536f674975c0\n"
        "content-type:application/json\n"
        "host:service.region.example.com\n"
        "x-sdk-date:20191115T033655Z\n"
        "\n"
        "content-type;host;x-sdk-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


async def test_signer_credential_reproduces_the_vector_from_an_outgoing_request() -> None:
    outgoing = Outgoing(
        method="GET",
        url=URL(f"https://service.region.example.com{VECTOR_PATH}?{VECTOR_QUERY}", encoded=True),
        headers=CIMultiDict({"Content-Type": "application/json", "X-Request-Id": "r1"}),
        body=b"",
    )
    when = calendar.timegm((2019, 11, 15, 3, 36, 55, 0, 0, 0))
    signer = Signer("vec", VECTOR_AK, Secret(VECTOR_SK), clock=lambda: float(when))
    await signer.apply(outgoing)
    assert outgoing.headers["X-Sdk-Date"] == "20191115T033655Z"
    assert outgoing.headers["Host"] == "service.region.example.com"
    assert outgoing.headers["Authorization"].endswith(f"Signature={VECTOR_SIGNATURE}")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("", "/"),
        ("/v1/infers/abc", "/v1/infers/abc/"),
        ("/v1/infers/abc/", "/v1/infers/abc/"),
        ("/a b/%7Euser", "/a%20b/~user/"),
        ("/caf%C3%A9/x", "/caf%C3%A9/x/"),
        ("/a+b/c=d/e:f", "/a%2Bb/c%3Dd/e%3Af/"),
        ("/a%2Fb", "/a/b/"),  # the SDK decodes the whole path before splitting it
    ],
)
def test_canonical_uri_encodes_each_segment_and_ends_with_a_slash(raw: str, canonical: str) -> None:
    assert canonical_uri(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", ""),
        ("b=2&a=1", "a=1&b=2"),
        ("a=2&a=1", "a=1&a=2"),
        ("flag&x=", "flag=&x="),
        ("q=a+b", "q=a%2Bb"),  # + is not a space here (apig_sdk uses unquote, not unquote_plus)
        ("q=a%20b&p=%E4%B8%AD", "p=%E4%B8%AD&q=a%20b"),
        ("B=1&a=1", "B=1&a=1"),  # by character code: upper case first
        ("=x&&k=v", "k=v"),
        ("k=v=w", "k=v%3Dw"),
    ],
)
def test_canonical_query_sorts_decodes_and_reencodes(raw: str, canonical: str) -> None:
    assert canonical_query(raw) == canonical


def test_canonical_headers_are_lowercased_trimmed_and_sorted() -> None:
    canonical, signed = canonical_request(
        "post",
        "/x",
        "",
        {"X-Sdk-Date": " 20240101T000000Z ", "HOST": "h:8443", "content-type": "a/b"},
        b"{}",
    )
    lines = canonical.split("\n")
    assert lines[0] == "POST"
    assert lines[3:6] == ["content-type:a/b", "host:h:8443", "x-sdk-date:20240101T000000Z"]
    assert signed == "content-type;host;x-sdk-date"
    assert lines[-1] == hashlib.sha256(b"{}").hexdigest()


def test_authorization_requires_host_and_date() -> None:
    with pytest.raises(ValueError, match="Host and X-Sdk-Date"):
        authorization(
            method="GET",
            raw_path="/",
            raw_query="",
            headers={"Host": "h"},
            body=b"",
            key="k",
            secret="s",
        )


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://svc.example.com/v1", "svc.example.com"),
        ("https://svc.example.com:443/v1", "svc.example.com"),
        ("http://127.0.0.1:8080/v1", "127.0.0.1:8080"),
        ("https://[::1]:8443/v1", "[::1]:8443"),
    ],
)
async def test_signer_signs_the_host_aiohttp_sends(url: str, host: str) -> None:
    outgoing = Outgoing("POST", URL(url, encoded=True), CIMultiDict(), b"{}")
    await Signer("c", "AK", Secret("SK"), clock=lambda: 0.0).apply(outgoing)
    assert outgoing.headers["Host"] == host
    assert "SignedHeaders=host;x-sdk-date," in outgoing.headers["Authorization"]


async def test_signer_replaces_client_injected_signing_headers_and_signs_security_token() -> None:
    headers = CIMultiDict(
        [
            ("Authorization", "SDK-HMAC-SHA256 Access=evil"),
            ("X-Sdk-Date", "19990101T000000Z"),
            ("X-Sdk-Content-Sha256", "UNSIGNED-PAYLOAD"),
            ("Content-Type", "application/json"),
            ("Content-Type", "text/plain"),
        ]
    )
    outgoing = Outgoing("POST", URL("https://h/v1/x", encoded=True), headers, b"{}")
    signer = Signer("c", "AK", Secret("SK"), Secret("sec-token"), clock=lambda: 0.0)
    await signer.apply(outgoing)
    h = outgoing.headers
    assert "X-Sdk-Content-Sha256" not in h
    assert h.getall("Content-Type") == ["application/json"]
    assert h.getall("X-Sdk-Date") == ["19700101T000000Z"]
    assert h["X-Security-Token"] == "sec-token"
    assert h["Authorization"].startswith(
        "SDK-HMAC-SHA256 Access=AK, SignedHeaders=content-type;host;x-sdk-date;x-security-token, "
    )
    assert "SK" not in repr(signer.__dict__) and "sec-token" not in repr(signer.__dict__)
