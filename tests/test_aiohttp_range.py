"""The aiohttp this runs on is inside the declared, tested range; without its C parser, no start."""

from __future__ import annotations

import os
import re
import tomllib

import aiohttp
from conftest import ROOT, free_port, run_gateway_cli

from gateway import _aiohttp


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def declared_range() -> tuple[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if d.startswith("aiohttp")]
    match = re.fullmatch(r"aiohttp>=([\d.]+),<([\d.]+)", spec)
    assert match, f"aiohttp's range must be '>=LOW,<HIGH', not {spec!r}"
    return match.group(1), match.group(2)


def test_installed_aiohttp_is_inside_the_declared_range() -> None:
    low, high = declared_range()
    installed = _version(aiohttp.__version__.split("+")[0])
    assert _version(low) <= installed < _version(high)


def test_the_private_internals_module_names_the_declared_floor() -> None:
    low, _ = declared_range()
    assert _aiohttp.TESTED_RANGE.startswith(low)
    assert low in (_aiohttp.__doc__ or "")


def test_the_c_parser_is_in_use_here() -> None:
    assert _aiohttp.c_extensions_missing() is None


def test_without_aiohttps_c_extensions_the_gateway_refuses_to_start() -> None:
    port = free_port()
    env = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    result = run_gateway_cli("demo", "--port", str(port), env=env)
    assert result.returncode == 2
    assert "refusing to start" in result.stderr
    assert "AIOHTTP_NO_EXTENSIONS" in result.stderr
    assert "Traceback" not in result.stderr
