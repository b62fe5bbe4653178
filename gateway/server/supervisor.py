"""``--workers N``: N gateway processes on one port, and a supervisor that serves nothing itself.

One Python process uses one core. The supervisor starts N workers (this program again, with
``--worker-index I --reuse-port``); each binds the port with SO_REUSEPORT and the kernel spreads
new connections over them. The supervisor

- forwards SIGTERM, SIGINT and SIGHUP to every worker (they run in sessions of their own, so a
  terminal's Ctrl-C reaches them once, through here, not twice: a second signal cuts streams);
- tells systemd ``READY=1`` once every worker has (each worker notifies a private socket of the
  supervisor's), and ``STOPPING=1`` at the first stop signal;
- exits when every worker has: 0 after a stop signal if each drained and exited 0; if a worker
  dies on its own, the others are stopped (drained) and the exit code is 1, so the service
  manager restarts the whole set;
- holds a pipe whose other end every worker watches: if the supervisor is killed outright, the
  workers see EOF and drain as on SIGTERM instead of holding the port as orphans.

Tokens: with N processes there is still one IAM call per credential per refresh. A token
credential's ``cache_file`` is shared (a fetch holds its flock, see ``credentials/cache_file``);
one without a ``cache_file`` gets one in the supervisor's private run directory (mode 0700, the
files 0600, removed at exit), so no token ever lands in a file another user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.config.model import AgencyCredential, IamPasswordCredential, Settings
from gateway.server.systemd import notify

log = logging.getLogger("gateway")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPING = (signal.SIGTERM, signal.SIGINT)
NOTIFY_NAME = "notify.sock"


def needs_shared_cache(settings: Settings) -> bool:
    """True when a token credential has no ``cache_file`` through which workers could share."""
    return any(
        isinstance(c, IamPasswordCredential | AgencyCredential) and c.cache_file is None
        for c in settings.credentials.values()
    )


def with_shared_cache(settings: Settings, directory: Path) -> Settings:
    """``settings`` with a ``cache_file`` in ``directory`` for each token credential without one."""
    credentials = dict(settings.credentials)
    for name, cfg in credentials.items():
        if isinstance(cfg, IamPasswordCredential | AgencyCredential) and cfg.cache_file is None:
            credentials[name] = replace(cfg, cache_file=directory / _file_name(name))
    return replace(settings, credentials=credentials)


def _file_name(name: str) -> str:
    """A file name for a credential's token: path-safe, the same in every worker (so not
    ``hash()``, which is salted per process), and unique per credential name."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}.json"


def watch_parent(fd: int, gone: Callable[[], None]) -> None:
    """Call ``gone`` once the supervisor's end of the pipe ``fd`` closes (it exited or died)."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        loop.remove_reader(fd)
        gone()

    loop.add_reader(fd, readable)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    exited: asyncio.Task[int] = field(init=False)

    def __post_init__(self) -> None:
        self.exited = asyncio.ensure_future(self.process.wait())

    def send(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class Supervisor:
    """Start ``workers`` processes serving ``settings`` and watch them until they all exit."""

    def __init__(
        self,
        settings: Settings,
        workers: int,
        worker_args: Sequence[str],
        notify_socket: str | None,
    ) -> None:
        self.settings = settings
        self.count = workers
        self.worker_args = list(worker_args)  # the CLI flags every worker gets (config, logging)
        self.notify_socket = notify_socket
        self.workers: list[_Worker] = []
        self.stopping = False

    async def run(self) -> int:
        """Serve through the workers until they have all exited; the process's exit code."""
        run_dir = Path(tempfile.mkdtemp(prefix="modelarts-gateway-", dir=_runtime_dir()))
        reserved: socket.socket | None = None
        ready_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        parent_r, parent_w = os.pipe()
        loop = asyncio.get_running_loop()
        try:
            ready_sock.bind(str(run_dir / NOTIFY_NAME))
            ready_sock.setblocking(False)
            port = self.settings.listen.port
            if port == 0:
                reserved, port = _reserve_port(self.settings.listen.host)
            args = [*self.worker_args, "--port", str(port), "--reuse-port"]
            args += ["--parent-fd", str(parent_r)]
            if needs_shared_cache(self.settings):
                args += ["--shared-cache-dir", str(run_dir)]
            env = {**os.environ, "NOTIFY_SOCKET": str(run_dir / NOTIFY_NAME)}
            for sig in FORWARDED:
                loop.add_signal_handler(sig, self._forward, sig)
            for index in range(self.count):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    *args,
                    "--worker-index",
                    str(index),
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(parent_r,),
                    start_new_session=True,  # signals reach workers once: through here
                )
                self.workers.append(_Worker(index, process))
                log.info("started worker %d (pid %d)", index, process.pid)
                if self.stopping:  # a stop signal came while the workers were being started
                    self.workers[-1].send(signal.SIGTERM)
            os.close(parent_r)
            parent_r = -1
            return await self._watch(ready_sock)
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            for worker in self.workers:  # only if this coroutine itself failed or was cancelled
                worker.send(signal.SIGKILL)
                await worker.exited
            ready_sock.close()
            if reserved is not None:
                reserved.close()
            for fd in (parent_r, parent_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(run_dir, ignore_errors=True)

    async def _watch(self, ready_sock: socket.socket) -> int:
        ready = asyncio.ensure_future(self._await_ready(ready_sock))
        pending = {w.exited: w for w in self.workers}
        failed = False
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    worker = pending.pop(task)
                    code = task.result()
                    if self.stopping and code == 0:
                        log.info("worker %d (pid %d) exited", worker.index, worker.process.pid)
                        continue
                    failed = True
                    log.error(
                        "worker %d (pid %d) exited with code %d%s",
                        worker.index,
                        worker.process.pid,
                        code,
                        "" if self.stopping else "; stopping the others",
                    )
                    if not self.stopping:
                        self._forward(signal.SIGTERM)
        finally:
            ready.cancel()
            self.workers.clear()
        return 1 if failed else 0

    async def _await_ready(self, ready_sock: socket.socket) -> None:
        """READY=1 to systemd once every worker has sent its own; later messages (STOPPING=1)
        are read and dropped, so a worker's notify never waits on a full socket queue."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            message = await loop.sock_recv(ready_sock, 4096)
            if seen < self.count and b"READY=1" in message.split(b"\n"):
                seen += 1
                if seen == self.count:
                    log.info("all %d workers serving", self.count)
                    notify(self.notify_socket, "READY=1")

    def _forward(self, sig: signal.Signals) -> None:
        if sig not in STOPPING and self.stopping:
            return  # no reload while draining: a draining worker no longer handles SIGHUP
        if sig in STOPPING and not self.stopping:
            self.stopping = True
            log.info("stopping %d worker(s)", len(self.workers))
            notify(self.notify_socket, "STOPPING=1")
        for worker in self.workers:
            worker.send(sig)


def _runtime_dir() -> str | None:
    """systemd's ``RuntimeDirectory=`` or the user's runtime directory, else the temp dir."""
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(name, "").split(":")[0]
        if value and os.path.isdir(value):
            return value
    return None


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """A free port for ``listen.port: 0``, held (bound, never listening) with SO_REUSEPORT so
    every worker gets the same one; a socket that does not listen is never given connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    port: int = sock.getsockname()[1]
    return sock, port
