"""Command line: ``serve`` (the default), ``check``, ``token`` and ``demo``.

The only place that turns errors into exit codes: 0 success or a clean stop on SIGTERM/SIGINT,
2 a bad config or bad arguments, 1 anything else that stops start-up (e.g. the port is taken).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from gateway._aiohttp import c_extensions_missing
from gateway.config.load import ConfigError, load_config, parse_config, read_config
from gateway.config.model import Settings
from gateway.log import setup_logging
from gateway.proxy.guard import check_exposure

COMMANDS = ("serve", "check", "demo", "hash-key", "token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelarts-gateway",
        description="OpenAI-style local gateway for Huawei Cloud ModelArts online services.",
    )
    sub = parser.add_subparsers(dest="command")

    def logging_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-format", default="text", choices=["text", "json"])

    serve = sub.add_parser("serve", help="run the gateway (the default command)")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="listen address (overrides listen.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N gateway processes sharing the port (SO_REUSEPORT) under a supervisor",
    )
    serve.add_argument(
        "--reuse-port", action="store_true", help="bind with SO_REUSEPORT (sets listen.reuse_port)"
    )
    serve.add_argument(
        "--worker-index",
        type=int,
        help="this process's index among processes sharing the port (default 0): its metrics "
        "port is listen.metrics_port + index",
    )
    # set by the --workers supervisor for its workers only
    serve.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--shared-cache-dir", help=argparse.SUPPRESS)
    logging_flags(serve)

    check = sub.add_parser("check", help="validate a config file: exit 0, or list problems, exit 2")
    check.add_argument("--config", required=True, help="YAML config file")

    hashk = sub.add_parser(
        "hash-key", help="print the sha256 form of an API key for listen.api_keys"
    )
    hashk.add_argument(
        "key", nargs="?", help="the key (read from standard input when omitted, safer)"
    )
    hashk.add_argument(
        "--generate",
        action="store_true",
        help="make a new random key; print it, then its sha256 form",
    )

    token = sub.add_parser(
        "token", help="fetch a token with a configured credential; print its project and expiry"
    )
    token.add_argument("--config", required=True, help="YAML config file")
    token.add_argument(
        "--credential", help="credential name (default: every one that yields a token)"
    )
    token.add_argument(
        "--show", action="store_true", help="also print the token itself (a secret: take care)"
    )

    demo = sub.add_parser("demo", help="run against an embedded fake IAM and model service")
    demo.add_argument("--host", default="127.0.0.1", help="gateway listen address")
    demo.add_argument("--port", type=int, default=8080, help="gateway listen port")
    logging_flags(demo)
    return parser


def _load(path: str) -> Settings | None:
    try:
        return load_config(path, os.environ)
    except ConfigError as exc:
        _invalid(path, exc)
        return None


def _invalid(path: str, exc: ConfigError) -> None:
    print(f"modelarts-gateway: invalid config {path}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help"):
        args_list.insert(0, "serve")  # `modelarts-gateway --config FILE` means serve
    args = _parser().parse_args(args_list)

    if args.command == "check":
        settings = _load(args.config)
        if settings is None:
            return 2
        print(
            f"{args.config}: OK ({len(settings.routes)} route(s), "
            f"{len(settings.credentials)} credential(s))"
        )
        return 0

    if args.command == "hash-key":
        from gateway.proxy.guard import hash_key

        if args.generate:
            import secrets

            key = "mag-" + secrets.token_urlsafe(32)  # 256 random bits
            print(f"key: {key}")
            print(f"sha256: {hash_key(key)}")
            return 0
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            print("modelarts-gateway: hash-key: no key given", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if args.command == "token":
        return _token(args.config, args.credential, args.show)

    if args.command == "demo":
        from gateway.demo import run_demo

        setup_logging(args.log_level, args.log_format)
        return _run(run_demo(args.host, args.port))

    if args.command != "serve":
        _parser().print_help(sys.stderr)
        return 2
    try:
        text = read_config(args.config)
        loaded = parse_config(text, args.config, os.environ)
    except ConfigError as exc:
        _invalid(args.config, exc)
        return 2
    from gateway.server.supervisor import Supervisor, with_shared_cache

    def overrides(given: Settings) -> Settings:
        """--host, --port and --reuse-port win over the file, and a --workers worker's tokens
        go through the supervisor's cache files: at start and at every reload."""
        listen = given.listen
        if args.host is not None:
            listen = dataclasses.replace(listen, host=args.host)
        if args.port is not None:
            listen = dataclasses.replace(listen, port=args.port)
        if args.reuse_port:
            listen = dataclasses.replace(listen, reuse_port=True)
        given = dataclasses.replace(given, listen=listen)
        if args.shared_cache_dir:
            given = with_shared_cache(given, Path(args.shared_cache_dir))
        return given

    settings = overrides(loaded)
    exposure = check_exposure(settings.listen)
    if exposure:
        print(f"modelarts-gateway: refusing to start: {exposure}", file=sys.stderr)
        return 2
    problem = _workers_problem(args.workers, args.worker_index, settings.listen.metrics_port)
    if problem:
        print(f"modelarts-gateway: {problem}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    notify_socket = os.environ.get("NOTIFY_SOCKET")
    if args.workers > 1:
        flags = ["--config", args.config, "--host", settings.listen.host]
        flags += ["--log-level", args.log_level, "--log-format", args.log_format]
        return _run_supervisor(Supervisor(settings, args.workers, flags, notify_socket).run())

    from gateway.server.reload import ConfigSource, digest
    from gateway.server.run import serve

    source = ConfigSource(Path(args.config), os.environ, overrides, digest(text))
    return _run(
        serve(
            settings,
            source=source,
            notify_socket=notify_socket,
            worker=args.worker_index or 0,
            parent_fd=args.parent_fd,
        )
    )


def _workers_problem(workers: int, index: int | None, metrics_port: int | None) -> str | None:
    """Why ``--workers`` / ``--worker-index`` cannot be used as given, or None."""
    if workers < 1:
        return "--workers must be >= 1"
    if index is not None and index < 0:
        return "--worker-index must be >= 0"
    if workers > 1 and index is not None:
        return "--worker-index is for one process; --workers numbers its workers itself"
    last = max(workers - 1, index or 0)
    if metrics_port is not None and metrics_port + last > 65535:
        return f"listen.metrics_port {metrics_port} + worker index {last} is over 65535"
    return None


def _run_supervisor(coro: Coroutine[Any, Any, int]) -> int:
    missing = c_extensions_missing()
    if missing is not None:
        coro.close()
        print(f"modelarts-gateway: refusing to start: {missing}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(coro)
    except OSError as exc:
        print(f"modelarts-gateway: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _token(path: str, credential: str | None, show: bool) -> int:
    from gateway.token_command import fetch_tokens, select

    settings = _load(path)
    if settings is None:
        return 2
    names, problem = select(settings, credential)
    if problem is not None:
        print(f"modelarts-gateway: token: {problem}", file=sys.stderr)
        return 2
    setup_logging("warning")  # cache-file and IAM warnings, on stderr
    return asyncio.run(fetch_tokens(settings, names, show))


def _runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:  # the optional extra `speed`: a faster event loop (imported by name: it may be absent)
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    return run


def _run(coro: Coroutine[Any, Any, None]) -> int:
    missing = c_extensions_missing()
    if missing is not None:
        coro.close()
        print(f"modelarts-gateway: refusing to start: {missing}", file=sys.stderr)
        return 2
    try:
        _runner()(coro)
    except OSError as exc:
        print(f"modelarts-gateway: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
