"""``${VAR}`` and ``${VAR:-default}`` in config strings, expanded from the environment given."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: Any, key: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, dict):
        return {k: expand(v, join_key(key, str(k)), environ, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, f"{key}[{i}]", environ, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(f"{key}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, value)


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
