"""The guard that keeps tests on loopback refuses the rest (tests/loopback_only.py)."""

from __future__ import annotations

import socket

import aiohttp
import loopback_only
import pytest


@pytest.mark.parametrize("target", ["169.254.169.254", "10.0.0.1", "8.8.8.8"])
def test_a_connect_off_loopback_is_refused_and_recorded(target: str) -> None:
    start = len(loopback_only.blocked)
    with socket.socket() as sock, pytest.raises(OSError, match="not loopback"):
        sock.connect((target, 80))
    assert loopback_only.blocked[start:] == [f"socket.connect ('{target}', 80)"]
    del loopback_only.blocked[start:]  # this test's own attempts are expected


async def test_the_metadata_default_address_is_unreachable_from_a_test() -> None:
    """The gateway's own client (aiohttp) is stopped too: ``metadata_url``'s default."""
    start = len(loopback_only.blocked)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.get("http://169.254.169.254/openstack/latest/securitykey")
    assert loopback_only.blocked[start:]
    del loopback_only.blocked[start:]


def test_a_name_lookup_other_than_localhost_is_refused() -> None:
    start = len(loopback_only.blocked)
    with pytest.raises(OSError):
        socket.getaddrinfo("iam.example.com", 443)
    socket.getaddrinfo("localhost", 80)
    socket.getaddrinfo("127.0.0.1", 80)
    assert loopback_only.blocked[start:] == ["socket.getaddrinfo 'iam.example.com'"]
    del loopback_only.blocked[start:]


def test_loopback_is_allowed() -> None:
    assert loopback_only.is_loopback("127.0.0.1") and loopback_only.is_loopback("::1")
    assert loopback_only.is_loopback("localhost") and loopback_only.is_loopback("127.8.9.10")
    assert not loopback_only.is_loopback("169.254.169.254")
    assert not loopback_only.is_loopback("example.com")
