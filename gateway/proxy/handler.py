"""The proxy handler: the only module that knows the order of the stages.

guard (Host/Origin 403, API key 401) → draining 503 → target (origin-form, canonical path) 400
→ route 404 → method 405 → key limits (concurrency, per minute, per day) 429 / store 503
→ body ≤ max_body 413 → model 400/403/404 → route concurrency 429
→ credential 502 → upstream (connect, first_byte 504, 401 replay once) 502/504
→ small answer whole, or headers then relay chunk by chunk → metrics and access log
finally: record the key's tokens, release the concurrency slots, release the upstream response

Each request reads one :class:`Runtime` (taken when it arrives) from start to end, so a reload
never changes a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from time import monotonic

from aiohttp import web

from gateway import log as gwlog
from gateway.config.model import ApiKey, Route
from gateway.credentials import Outgoing
from gateway.errors import (
    Forbidden,
    GatewayError,
    HeadersTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from gateway.http1 import UpstreamClient
from gateway.limits import Store
from gateway.limits.memory import MemoryStore
from gateway.metrics import Metrics
from gateway.proxy.body import BodyInfo, model_edit, sniff, splice
from gateway.proxy.exchange import CLIENT_GONE, Exchange, RequestIds, error_response, record
from gateway.proxy.failures import AuthFailures
from gateway.proxy.guard import add_cors, preflight
from gateway.proxy.headers import upstream_request_headers
from gateway.proxy.limits import (
    ConcurrencyLimit,
    Held,
    read_body,
    too_large,
    wants_continue,
)
from gateway.proxy.quota import KeyLimiter, Ticket
from gateway.proxy.redact import sent_secrets
from gateway.proxy.response import is_small, relay_body, whole
from gateway.proxy.routing import PathGroup, check_method
from gateway.proxy.runtime import Runtime
from gateway.proxy.sse import Relay
from gateway.proxy.target import Target, Targets, without_keys
from gateway.proxy.upstream import send

log = logging.getLogger("gateway.proxy")

# Answers a guarded call: (request, its exchange record, the caller's key or None, the runtime
# the request took when it arrived).
Answer = Callable[[web.Request, Exchange, ApiKey | None, Runtime], Awaitable[web.StreamResponse]]


class Proxy:
    def __init__(
        self,
        runtime: Runtime,
        client: UpstreamClient,
        metrics: Metrics,
        limits_store: Store | None = None,
    ) -> None:
        self.runtime = runtime  # replaced whole by a reload (swap), never changed in place
        self.client = client
        self.metrics = metrics
        self.targets = Targets()  # parse_target, remembered: the same for every config
        # one per process: the store (its counts) and its health outlive every reload
        store = limits_store if limits_store is not None else MemoryStore()
        self.limiter = KeyLimiter(store, runtime.settings.limits_store, metrics)
        self.request_id = RequestIds()
        self.auth_failures = AuthFailures(metrics)
        self.relays: set[Relay] = set()
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def swap(self, runtime: Runtime) -> Runtime:
        """Serve new requests with ``runtime``; the old one (returned) keeps its requests."""
        old, self.runtime = self.runtime, runtime
        return old

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A proxied call."""
        return await self.serve(request, self.proxy)

    async def serve(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        """Any client call, proxied or answered by the gateway itself (``/v1/models``).

        One request id, one guard, one error shape, one access-log line and the same metrics.
        """
        ex = Exchange(rid=self.request_id(request), start=monotonic())
        gwlog.request_id.set(ex.rid)
        rt = self.runtime
        rt.enter()
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                response = await self._guarded(request, ex, answer, rt)
            except GatewayError as err:
                ex.status = err.status
                if ex.ttfb is None:  # refused by the gateway, not answered by the upstream
                    self.metrics.child(self.metrics.rejected, ex.route, err.code).inc()
                if err.status >= 500:
                    log.warning("%s: %s", err.code, err.message)
                response = error_response(err, ex.rid)
                if ex.cors_origin:
                    add_cors(response, ex.cors_origin)
                if self.draining or ex.close or err.closes or wants_continue(request):
                    # a body promised after "100 Continue", never asked for, may still come
                    response.force_close()
            except asyncio.CancelledError:
                ex.status = CLIENT_GONE
                if ex.end == "-":
                    ex.end = "client_gone"
                record(self.metrics, request, ex, monotonic())
                raise
            record(self.metrics, request, ex, monotonic())
            return response
        finally:
            rt.leave()
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _guarded(
        self, request: web.Request, ex: Exchange, answer: Answer, rt: Runtime
    ) -> web.StreamResponse:
        max_header_bytes = rt.settings.listen.max_header_bytes
        if sum(len(k) + len(v) + 4 for k, v in request.raw_headers) > max_header_bytes:
            ex.close = True
            raise HeadersTooLarge(f"the request headers are over {max_header_bytes} bytes in total")
        # before check(): its 401/403 must be readable by an allowed origin's page too
        ex.cors_origin = rt.guard.allowed_origin(request)
        try:
            key = rt.guard.check(request)
        except (Unauthorized, Forbidden) as err:
            # a client without the right key or from a foreign page gets one answer per
            # connection: it cannot hold the connection open after it (issue 8)
            ex.close = True
            if isinstance(err, Unauthorized):
                self.auth_failures.failed(request.remote, err.code)
            raise
        if ex.cors_origin and request.method == "OPTIONS":
            ex.status = 204
            response = preflight(ex.cors_origin, request)
            response.headers["X-Request-Id"] = ex.rid
            return response
        if key is not None:
            ex.key = key.name
        return await answer(request, ex, key, rt)

    async def proxy(
        self, request: web.Request, ex: Exchange, key: ApiKey | None, rt: Runtime
    ) -> web.StreamResponse:
        """Answer a guarded call from the upstream its route names."""
        if self.draining:
            raise ServiceUnavailable("the gateway is shutting down; retry on another instance")
        target = self.targets(request.raw_path)
        if rt.key_digests and target.query:
            target = replace(target, query=without_keys(target.query, rt.key_digests))
        group = rt.router.match(target.path)
        check_method(request.method, group.routes)
        # concurrency slots before the body is read: a slow upload holds a slot, not memory
        # beyond the limit (the route's when the path alone decides it, else after the body)
        taken: list[ConcurrencyLimit] = []
        held = Held(rt.body_budget)
        if len(group.routes) == 1:
            ex.route = group.routes[0].name
        # the key's limits are decided by the headers alone: before "100 Continue" and the body
        ticket: Ticket | None = None
        if key is not None:
            ticket = await self.limiter.admit(key, rt.key_limits.get(key.name))
        try:
            if len(group.routes) == 1:
                _take(rt.route_limits[group.routes[0].name], taken)
            route, body = await self._select(request, group, key, ex, held, rt)
            check_method(request.method, (route,))
            if len(group.routes) > 1:
                _take(rt.route_limits[route.name], taken)
            return await self._forward(request, route, target, body, ex, rt)
        finally:
            held.release()
            for limit in taken:
                limit.release()
            if ticket is not None:
                ticket.release()
                if ex.tokens:
                    await self.limiter.record_tokens(ticket.key, ex.tokens)

    async def _select(
        self,
        request: web.Request,
        group: PathGroup,
        key: ApiKey | None,
        ex: Exchange,
        held: Held,
        rt: Runtime,
    ) -> tuple[Route, bytes]:
        """The route for this request and its body (read within the route's max_body), edited
        for the route: a model alias's upstream name, ``include_usage``."""
        restricted = key is not None and key.models is not None
        if not group.needs_model and not restricted:
            route = group.routes[0]
            ex.route = route.name
            body = await read_body(request, route.max_body, rt.settings.listen.body_timeout, held)
            if not _asks_usage(route, request):
                return route, body
            return route, _edited(route, body, await sniff(body), None, ex, True)
        if len(group.routes) == 1:
            ex.route = group.routes[0].name
        max_body = max(r.max_body for r in group.routes)
        body = await read_body(request, max_body, rt.settings.listen.body_timeout, held)
        info = await sniff(body)
        model = info.model
        if info.error is not None:
            # a body that is not JSON goes to the path's default route, unless a key's allowlist
            # must read its model (then it stays a 400, as does an ambiguous or non-string model)
            if info.error[0] != "invalid_json" or restricted or group.default is None:
                info.raise_error()
            model = None
        if key is not None and key.models is not None and model not in key.models:
            raise Forbidden(
                f"API key {key.name!r} may not use this model", code="model_not_allowed"
            )
        route = group.select(model)
        ex.route = route.name
        if len(body) > route.max_body:
            raise too_large(len(body), route.max_body)
        return route, _edited(route, body, info, model, ex, _asks_usage(route, request))

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        target: Target,
        body: bytes,
        ex: Exchange,
        rt: Runtime,
    ) -> web.StreamResponse:
        total = route.timeouts.total
        deadline = ex.start + total if total else monotonic() + 10 * 365 * 86400.0
        outgoing = Outgoing(
            method=request.method,
            url=rt.bases[route.name].url(target),
            headers=upstream_request_headers(
                request.headers,
                trust_forwarded=rt.settings.listen.trust_forwarded,
                keys=rt.key_digests,
            ),
            body=body,
        )
        outgoing.headers["X-Request-Id"] = ex.rid
        upstream = await send(
            self.client, route, rt.credentials[route.credential], outgoing, deadline
        )
        try:
            ex.ttfb = monotonic() - ex.start
            self.metrics.route(route.name).ttfb.observe(ex.ttfb)
            ex.status = upstream.status
            response: web.StreamResponse
            if is_small(upstream):
                # only an error answer is searched for secrets to take out (apig_error)
                secrets = (
                    (*rt.secrets, *sent_secrets(outgoing.headers)) if upstream.status >= 400 else ()
                )
                response = await whole(upstream, route, ex, deadline, self.metrics, secrets)
            else:
                response = await relay_body(
                    request,
                    route,
                    upstream,
                    ex,
                    deadline if total else None,
                    self.metrics,
                    self.relays,
                )
        finally:
            # back to the pool when the body was read to its end; aiohttp closes it otherwise
            upstream.release()
        return response


def _asks_usage(route: Route, request: web.Request) -> bool:
    """``include_usage`` edits only the OpenAI endpoints that define ``stream_options``
    (``/chat/completions``, ``/completions``): ``/v1/responses`` always reports its usage, and a
    strict server or a custom ``/v1/sse`` image could refuse a member it does not know."""
    # request.path decodes the target: only for a route that edits usage
    return route.include_usage and request.path.endswith("/completions")


def _edited(
    route: Route,
    body: bytes,
    info: BodyInfo,
    model: str | None,
    ex: Exchange,
    ask_usage: bool,
) -> bytes:
    """``body`` as it goes up ``route``: the alias's upstream name for ``model``, usage asked
    for (``ask_usage``); ``ex`` learns the model's label and whether the answer's usage event
    is ours."""
    if model is not None and model in route.models:
        ex.model = model  # a configured name: the only kind a metric label may carry
    edits = []
    upstream_name = route.upstream_models.get(model) if model is not None else None
    if upstream_name is not None:
        edits.append(model_edit(info, upstream_name))
    if ask_usage and info.ask_usage is not None:
        edits.append(info.ask_usage)
        ex.usage.hide_event = True
    return splice(body, edits) if edits else body


def _take(limit: ConcurrencyLimit, taken: list[ConcurrencyLimit]) -> None:
    limit.acquire()
    taken.append(limit)
