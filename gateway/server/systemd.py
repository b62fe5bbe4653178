"""systemd ``Type=notify`` support without a dependency: one datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("gateway")


def notify(socket_path: str | None, message: str) -> None:
    """Send e.g. ``READY=1`` to the service manager; a no-op outside systemd."""
    if not socket_path:
        return
    # a leading "@" names a socket in the abstract namespace (sd_notify(3))
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", message, exc.strerror or exc)
