"""The rule "tests never reach any address other than loopback", enforced rather than hoped for.

An audit hook (PEP 578: ``socket.connect``, ``socket.sendto``, ``socket.getaddrinfo``) refuses
every IPv4/IPv6 connect or datagram to a non-loopback address and every name lookup other than
``localhost`` or a loopback literal, and records it; ``conftest.py`` fails the test that caused
one. It matters most for issue 12's types, whose defaults point at the real platform
(``metadata_url`` is ``http://169.254.169.254``) and whose SDK cross-checks run the real SDK.
Gateway processes started by tests are not covered (a hook lives in one interpreter).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any

blocked: list[str] = []  # every refused attempt, in order ("socket.connect ('10.0.0.1', 80)")


def is_loopback(host: object) -> bool:
    """``localhost`` or a loopback literal (``127.0.0.0/8``, ``::1``)."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _refuse(event: str, target: object) -> None:
    blocked.append(f"{event} {target!r}")
    raise OSError(f"a test tried to reach {target!r}, which is not loopback")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) and address else address
            if not is_loopback(host):
                _refuse(event, address)
    elif event == "socket.getaddrinfo":
        host = args[0]
        # None or "" or a wildcard: a passive lookup for bind(), which reaches nothing
        if host in (None, "", b"", "0.0.0.0", "::") or is_loopback(host):
            return
        _refuse(event, host)


def install() -> None:
    """Add the hook once per interpreter (audit hooks cannot be removed)."""
    if _hook not in getattr(sys, "_loopback_only_hooks", ()):
        sys.addaudithook(_hook)
        sys._loopback_only_hooks = (_hook,)  # type: ignore[attr-defined]
