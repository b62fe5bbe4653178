"""Which route serves a request: longest path prefix, then the body's ``model``. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.config.model import Route
from gateway.errors import BadRequest, MethodNotAllowed, NotFound


@dataclass(frozen=True)
class PathGroup:
    """The routes sharing one local path prefix."""

    path: str
    routes: tuple[Route, ...]
    by_model: dict[str, Route] = field(default_factory=dict)
    fallback: Route | None = None
    # takes a body without "model" or not JSON (ModelArts' /v1/sse carries the image's own body):
    # the route that says ``default: true``, or the only route on the path
    default: Route | None = None

    @property
    def needs_model(self) -> bool:
        """True when the body's ``model`` decides the route (or must be allowed)."""
        return bool(self.by_model)

    def select(self, model: str | None) -> Route:
        if model is None and self.default is not None:
            return self.default
        if model is not None and model in self.by_model:
            return self.by_model[model]
        if self.fallback is not None:
            return self.fallback
        if model is None:
            raise BadRequest(
                'this path needs a JSON body with a "model" field', code="missing_model"
            )
        # the model name is the client's own input: echo it only in a bounded form
        raise NotFound(f"the model '{model[:100]}' is not served here", code="model_not_found")


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        grouped: dict[str, list[Route]] = {}
        for route in routes:
            grouped.setdefault(route.path, []).append(route)
        groups = []
        for path, members in grouped.items():
            by_model = {m: r for r in members for m in r.models}
            fallback = next((r for r in members if not r.models), None)
            default = next((r for r in members if r.default), None)
            if default is None and len(members) == 1:
                default = members[0]
            groups.append(PathGroup(path, tuple(members), by_model, fallback, default))
        # longest prefix first
        self.groups = tuple(sorted(groups, key=lambda g: len(g.path), reverse=True))

    def match(self, path: str) -> PathGroup:
        for group in self.groups:
            p = group.path
            if p == "/" or path == p or path.startswith(p + "/"):
                return group
        raise NotFound("no route for this path", code="route_not_found")

    def serves(self, model: str) -> bool:
        """True if some route lists ``model``."""
        return any(model in group.by_model for group in self.groups)

    def models(self) -> list[str]:
        """Every configured model name, in config order, without repeats."""
        seen: dict[str, None] = {}
        for group in sorted(self.groups, key=lambda g: g.path):
            for route in group.routes:
                for m in route.models:
                    seen.setdefault(m, None)
        return list(seen)


def check_method(method: str, routes: Iterable[Route]) -> None:
    """405 unless one of ``routes`` proxies ``method`` (TRACE would echo the credential)."""
    allow: dict[str, None] = {}
    for route in routes:
        if method in route.methods:
            return
        allow.update(dict.fromkeys(route.methods))
    raise MethodNotAllowed(method, tuple(allow))
