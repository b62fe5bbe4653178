"""The things measured side by side, each started and stopped by the benchmark on loopback.

- ``direct``: the client talks to the fake upstream itself (and sends the token itself).
- ``gateway``: ``python -m gateway --config FILE`` with a static-token credential.
- ``nginx``: one worker, ``proxy_buffering off``, injecting the same ``X-Auth-Token``.
- ``floor``: ``floor_proxy.py``, aiohttp's low-level server and the gateway's upstream client
  with none of the gateway's own work: the floor of what its building blocks allow.

Each target gives the address the client calls, which processes to measure, and a version.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import procstat
from common import CLIENT_PATH, TOKEN, TOKEN_HEADER, UPSTREAM_PATH, UPSTREAM_PREFIX

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class TargetUnavailable(Exception):
    """The target cannot be measured on this machine (not installed, would not start)."""


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``GET path`` until it answers 200, the process exits or ``deadline`` passes."""
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetUnavailable(f"exited with code {proc.returncode} while starting")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"HTTP {response.status}"
        except OSError as exc:
            last = type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.1)
    raise TargetUnavailable(f"not serving {path} within {START_TIMEOUT:g} s ({last})")


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for a note in the report."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:200] for line in text[-lines:])


class Target:
    """A proxy (or none) between the client and the fake upstream."""

    name = "?"
    token = False  # whether the client must send the upstream's token itself
    path = CLIENT_PATH

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        self.upstream_port = upstream_port
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        """Start and wait until it serves; raises :class:`TargetUnavailable`."""

    def pids(self) -> list[int]:
        """The processes whose CPU and memory are the proxy's."""
        return []

    def version(self) -> str:
        return ""

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self.exit_code = proc.returncode


class Direct(Target):
    """No proxy: the baseline every delay is compared with."""

    name = "direct"
    token = True
    path = UPSTREAM_PATH

    def start(self) -> None:
        self.port = self.upstream_port


class Gateway(Target):
    """The gateway of this repository, started from its own CLI."""

    name = "gateway"
    default_command = "{python} -m gateway --config {config}"

    def __init__(self, upstream_port: int, workdir: Path, command: str | None = None) -> None:
        super().__init__(upstream_port, workdir)
        self.command = command or self.default_command
        self.log = workdir / "gateway.log"

    def config_text(self) -> str:
        return (
            f"listen: {{host: 127.0.0.1, port: {self.port}}}\n"
            "credentials:\n"
            f"  bench: {{type: token, token: {TOKEN}}}\n"
            "routes:\n"
            "  - name: bench\n"
            "    path: /v1\n"
            f"    upstream: http://127.0.0.1:{self.upstream_port}{UPSTREAM_PREFIX}\n"
            "    credential: bench\n"
            "    max_body: 1MiB\n"
            "    max_concurrency: 2000\n"
            "    heartbeat: 0\n"
            "    timeouts: {connect: 5, first_byte: 60, idle: 60, total: 3600}\n"
        )

    def start(self) -> None:
        self.port = free_port()
        config = self.workdir / "gateway.yaml"
        config.write_text(self.config_text())
        argv = shlex.split(self.command.format(python=sys.executable, config=config))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_http(self.port, "/healthz", time.monotonic() + START_TIMEOUT, self.proc)
        except TargetUnavailable as exc:
            self.stop()
            raise TargetUnavailable(f"gateway: {exc}; log: {tail(self.log)}") from None

    def pids(self) -> list[int]:
        return procstat.with_descendants(self.proc.pid) if self.proc else []

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("modelarts-gateway")
        except PackageNotFoundError:
            v = "?"
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"modelarts-gateway {v}" + (f" ({rev})" if rev else "")


class Floor(Gateway):
    """aiohttp's low-level server and the gateway's upstream client, and nothing else
    (``floor_proxy.py``): what the gateway's building blocks cost before its own work."""

    name = "floor"
    default_command = "{python} benchmarks/floor_proxy.py {config}"

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        super().__init__(upstream_port, workdir, None)
        self.log = workdir / "floor.log"

    def version(self) -> str:
        from importlib.metadata import version

        return f"aiohttp {version('aiohttp')} web.Server + gateway.http1"


class Nginx(Target):
    """nginx as a plain unbuffered reverse proxy: the bar to measure against."""

    name = "nginx"

    def __init__(self, upstream_port: int, workdir: Path) -> None:
        super().__init__(upstream_port, workdir)
        self.binary = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
        )
        self.prefix = workdir / "nginx"
        self.master_pid = 0

    def config_text(self) -> str:
        p = self.prefix
        user = ""
        if os.geteuid() == 0:  # as root nginx would drop to "nobody"; stay the user we are
            user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};\n"
        temp = "\n".join(
            f"    {kind}_temp_path {p}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
worker_rlimit_nofile 8192;
events {{
    worker_connections 4096;
}}
http {{
    access_log {p}/access.log;
{temp}
    upstream bench {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        client_max_body_size 1m;
        location / {{
            proxy_pass http://bench{UPSTREAM_PREFIX}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header {TOKEN_HEADER} {TOKEN};
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location = /healthz {{
            return 200 "ok";
        }}
    }}
}}
"""

    def start(self) -> None:
        if self.binary is None:
            raise TargetUnavailable("nginx: not installed (apt-get install nginx); skipped")
        self.port = free_port()
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config_text())
        error_log = self.prefix / "error.log"
        argv = [self.binary, "-e", str(error_log), "-c", str(conf), "-p", str(self.prefix)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.master_pid = self.proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        try:
            wait_http(self.port, "/healthz", deadline, self.proc)
            while not procstat.children(self.master_pid):
                if time.monotonic() > deadline:
                    raise TargetUnavailable("no worker process")
                time.sleep(0.05)
        except TargetUnavailable as exc:
            self.stop()
            raise TargetUnavailable(f"nginx: {exc}; log: {tail(error_log)}") from None

    def pids(self) -> list[int]:
        # the single worker does all the proxying; the master only waits for signals
        return procstat.children(self.master_pid) if self.proc else []

    def version(self) -> str:
        if self.binary is None:
            return "not installed"
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True, check=False)
        return out.stderr.strip().replace("nginx version: nginx/", "")


def make(name: str, upstream_port: int, workdir: Path, gateway_command: str | None) -> Target:
    """A target by name."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "direct":
        return Direct(upstream_port, workdir)
    if name == "gateway":
        return Gateway(upstream_port, workdir, gateway_command)
    if name == "nginx":
        return Nginx(upstream_port, workdir)
    if name == "floor":
        return Floor(upstream_port, workdir)
    raise ValueError(f"unknown target {name!r}")


def warm_up(target: Target) -> str | None:
    """A few streamed and plain requests through the target; None if all came back whole."""
    body = (
        b'{"model":"bench","stream":%b,"messages":[{"role":"user","content":"hi"}],'
        b'"bench":{"events":20,"interval_ms":0,"size":200}}'
    )
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers[TOKEN_HEADER] = TOKEN
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        for i in range(12):
            stream = i % 4 == 0
            conn.request("POST", target.path, body % (b"true" if stream else b"false"), headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                return f"warm-up answered HTTP {response.status}: {data[:200]!r}"
            if stream and not data.endswith(b"data: [DONE]\n\n"):
                return "warm-up stream did not end with [DONE]"
    except (OSError, http.client.HTTPException) as exc:
        return f"warm-up failed: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    return None
