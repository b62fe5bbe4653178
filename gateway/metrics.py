"""Prometheus metrics on a registry of the app's own (never the global one).

Label values come only from config names (route, credential, key) and small enums (status,
reason). The two per-chunk figures (relayed bytes, gaps between upstream chunks) are kept in
plain per-route counters that a collector reads at scrape time: a prometheus_client
``observe()`` takes a lock and costs microseconds, the relay budget is ~25 µs per event.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.tally import (
    CounterSeries,
    HistogramSeries,
    TallyCounter,
    TallyGauge,
    TallyHistogram,
)

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    900,
    1800,
)
GAP_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

STREAM_END_REASONS = (
    "done",
    "client_gone",
    "idle_timeout",
    "total_timeout",
    "upstream_error",
    "shutdown",
)


class ChunkStats:
    """Per-route hot-path accumulators; plain attributes, updated without locks on the loop."""

    __slots__ = ("bucket_counts", "bytes", "gap_sum")

    def __init__(self) -> None:
        self.bytes = 0
        self.gap_sum = 0.0
        # one slot per bucket bound plus +Inf; counts are per slot, made cumulative at scrape
        self.bucket_counts = [0] * (len(GAP_BUCKETS) + 1)

    @property
    def gap_count(self) -> int:
        """Gaps counted: the histogram's count, summed at scrape rather than kept per chunk."""
        return sum(self.bucket_counts)

    def gap(self, seconds: float) -> None:
        """Count one gap (the relay does the same inline, GAP_BUCKETS and bucket_counts)."""
        self.bucket_counts[bisect_left(GAP_BUCKETS, seconds)] += 1
        self.gap_sum += seconds


class _ChunkCollector(Collector):
    def __init__(self, stats: dict[str, ChunkStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        relayed = CounterMetricFamily(
            "gateway_relayed_bytes", "Response body bytes relayed to clients.", labels=["route"]
        )
        gaps = HistogramMetricFamily(
            "gateway_stream_chunk_gap_seconds",
            "Time between consecutive upstream chunks of a response.",
            labels=["route"],
        )
        for route, s in self._stats.items():
            relayed.add_metric([route], s.bytes)
            cumulative, buckets = 0, []
            for bound, count in zip((*GAP_BUCKETS, float("inf")), s.bucket_counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            gaps.add_metric([route], buckets, s.gap_sum)
        yield relayed
        yield gaps

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _PoolCollector(Collector):
    """``gateway_upstream_connections{route,state}``, counted from the pool at scrape time."""

    def __init__(
        self,
        routes: Callable[[], Iterable[str]],
        sizes: Callable[[], Mapping[str, tuple[int, int]]],
    ) -> None:
        self._routes = routes
        self._sizes = sizes

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_upstream_connections",
            "Open upstream connections by route: idle in the pool, or carrying a request.",
            labels=["route", "state"],
        )
        sizes = self._sizes()
        for route in self._routes():
            idle, active = sizes.get(route, (0, 0))
            family.add_metric([route, "idle"], idle)
            family.add_metric([route, "active"], active)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """Every collector the gateway exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # updated on every request: plain numbers exported at scrape time (gateway/tally.py)
        self.requests = TallyCounter(
            "gateway_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            r,
        )
        self.duration = TallyHistogram(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response.",
            ["route"],
            r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttfb = TallyHistogram(
            "gateway_time_to_first_byte_seconds",
            "Time from request to the upstream's first response byte.",
            ["route"],
            r,
            buckets=LATENCY_BUCKETS,
        )
        self.active_streams = TallyGauge(
            "gateway_active_streams", "Responses being relayed now.", ["route"], r
        )
        self.stream_end = TallyCounter(
            "gateway_stream_end",
            "Relayed responses by how they ended.",
            ["route", "reason"],
            r,
        )
        self.heartbeats = Counter(
            "gateway_heartbeats", "SSE keep-alive comments sent.", ["route"], registry=r
        )
        self.token_refreshes = Counter(
            "gateway_token_refreshes",
            "Token fetches by credential and result.",
            ["credential", "result"],
            registry=r,
        )
        self.token_expiry = Gauge(
            "gateway_token_expiry_timestamp_seconds",
            "When the cached token expires (epoch).",
            ["credential"],
            registry=r,
        )
        self.rejected = Counter(
            "gateway_rejected",
            "Requests refused by the gateway itself, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.key_requests = TallyCounter(
            "gateway_key_requests",
            "Requests per downstream API key name and status.",
            ["key", "status"],
            r,
        )
        # issue 11: label values from config only (route, key and model names), kind an enum
        self.tokens = TallyCounter(
            "gateway_tokens",
            "Tokens the answers reported in their usage, by route, API key, model and kind"
            " (prompt, completion).",
            ["route", "key", "model", "kind"],
            r,
        )
        self._chunks: dict[str, ChunkStats] = {}
        r.register(_ChunkCollector(self._chunks))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._routes: dict[str, RouteSeries] = {}
        # issue 8: clients that are refused before they can use the credential
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "New connections closed at once because listen.max_connections were open.",
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Requests refused for a missing or wrong API key, by reason.",
            ["reason"],
            registry=r,
        )
        # issue 11: SIGHUP and config_watch
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Config reloads by result: ok (now serving) or error (refused, the old one serves).",
            ["result"],
            registry=r,
        )
        # issue 11: per-key limits and the store that counts them
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused by a key's limits, by key name and limit.",
            ["key", "limit"],
            registry=r,
        )
        self.limits_store_errors = Counter(
            "gateway_limits_store_errors",
            "Calls to the limits store that failed (limits_store.on_error applied), by operation.",
            ["operation"],
            registry=r,
        )

    def watch_pool(
        self,
        routes: Callable[[], Iterable[str]],
        sizes: Callable[[], Mapping[str, tuple[int, int]]],
    ) -> None:
        """Export the upstream pool's size per route (``sizes``: route → (idle, active)) for the
        routes of the config serving now (``routes``: a reload may add or remove some)."""
        self.registry.register(_PoolCollector(routes, sizes))

    def child(
        self,
        metric: Counter | Gauge | Histogram | TallyCounter | TallyGauge | TallyHistogram,
        *labels: str,
    ) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` takes a lock and builds a key on
        every call, and the per-request path makes several. Label values are bounded (config
        names, small enums), so the memo is too."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def route(self, name: str) -> RouteSeries:
        """The per-request series of route ``name``, found once and remembered (routes are
        config names: bounded)."""
        series = self._routes.get(name)
        if series is None:
            series = self._routes[name] = RouteSeries(self, name)
        return series

    def chunk_stats(self, route: str) -> ChunkStats:
        stats = self._chunks.get(route)
        if stats is None:
            stats = self._chunks[route] = ChunkStats()
        return stats

    def token_refreshed(self, credential: str, result: str, expires_at: float | None) -> None:
        self.token_refreshes.labels(credential, result).inc()
        if expires_at is not None:
            self.token_expiry.labels(credential).set(expires_at)


class RouteSeries:
    """One route's series that every request updates, looked up once per request instead of
    one ``child()`` (a key built and hashed) per update."""

    __slots__ = ("_metrics", "_name", "_requests", "chunks", "done", "duration", "ttfb")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self.duration: HistogramSeries = metrics.child(metrics.duration, name)
        self.ttfb: HistogramSeries = metrics.child(metrics.ttfb, name)
        self.done: CounterSeries = metrics.child(metrics.stream_end, name, "done")
        self.chunks = metrics.chunk_stats(name)
        self._requests: dict[int, CounterSeries] = {}

    def requests(self, status: int) -> CounterSeries:
        """``gateway_requests_total{route, status}``'s series for ``status``."""
        series = self._requests.get(status)
        if series is None:
            m = self._metrics
            series = self._requests[status] = m.child(m.requests, self._name, str(status))
        return series
