"""listen.backlog: the listen queue, 1024 by default (issue 9, item 5)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import signal
import socket
from pathlib import Path

import pytest
import yaml
from conftest import base_config, free_port, start_gateway_process, stop_process, wait_healthy

from gateway.config.load import ConfigError, parse_settings
from gateway.testing import FakeCloud


def test_backlog_defaults_to_1024_and_is_configurable(cloud: FakeCloud) -> None:
    config = copy.deepcopy(base_config(cloud))
    assert parse_settings(config, {}).listen.backlog == 1024
    config["listen"]["backlog"] = 4096
    assert parse_settings(config, {}).listen.backlog == 4096


@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_a_bad_backlog_names_its_key(cloud: FakeCloud, value: object) -> None:
    config = copy.deepcopy(base_config(cloud))
    config["listen"]["backlog"] = value
    with pytest.raises(ConfigError, match=r"listen\.backlog"):
        parse_settings(config, {})


# --- the listening socket really has it -------------------------------------------------------

SOMAXCONN_PATH = Path("/proc/sys/net/core/somaxconn")
SOMAXCONN = int(SOMAXCONN_PATH.read_text()) if SOMAXCONN_PATH.exists() else 0  # caps backlog
TCP_RTO_INITIAL = 1.0  # RFC 6298's initial retransmit timeout, Linux's for a SYN


@pytest.mark.skipif(not SOMAXCONN, reason="Linux's accept queue rules")
@pytest.mark.parametrize("backlog", [None, 300])  # None: the default, 1024
async def test_the_listen_queue_holds_backlog_connections_and_the_rest_wait_for_a_syn_retransmit(
    cloud: FakeCloud, tmp_path: Path, backlog: int | None
) -> None:
    # The gateway process is stopped (SIGSTOP), so nothing is accepted: the kernel completes the
    # handshake of exactly backlog + 1 connections (capped by somaxconn) and drops the SYN of
    # the rest, which connect only after the SYN is retransmitted. aiohttp's default (128) or a
    # backlog that never reached listen(2) fails the count.
    config = copy.deepcopy(base_config(cloud))
    port = free_port()
    config["listen"]["port"] = port
    if backlog is not None:
        config["listen"]["backlog"] = backlog
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    queue = min(backlog or 1024, SOMAXCONN) + 1
    proc = await start_gateway_process("--config", str(path))
    socks: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc)
        proc.send_signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(queue + 50):
            sock = socket.socket()
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            socks.append(sock)
        connected: dict[int, float] = {}
        done = asyncio.Event()

        def on_writable(sock: socket.socket) -> None:
            loop.remove_writer(sock)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            connected[sock.fileno()] = loop.time() - started
            if len(connected) == len(socks):
                done.set()

        for sock in socks:
            loop.add_writer(sock, on_writable, sock)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TCP_RTO_INITIAL / 2):
                await done.wait()
        assert len(connected) == queue, f"{len(connected)} connected while stopped"
        proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(TCP_RTO_INITIAL * 5):
            await done.wait()  # the rest, once their SYN is sent again
        late = sorted(t for fd, t in connected.items() if t > TCP_RTO_INITIAL / 2)
        assert len(late) == 50
        print(f"\n{queue} queued at once; the other 50 connected {late[0]:.2f}-{late[-1]:.2f} s in")
        assert late[0] >= TCP_RTO_INITIAL * 0.9
    finally:
        for sock in socks:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(sock)
            sock.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
        await stop_process(proc)
