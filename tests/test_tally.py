"""The plain-number metrics (``gateway/tally.py``) export what prometheus_client's own
Counter, Gauge and Histogram export for the same updates: the same text, byte for byte, apart
from the ``_created`` timestamps (the time each series was first used)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.tally import TallyCounter, TallyGauge, TallyHistogram

# observations on, just under, just over and far past the bounds, and between them
AMOUNTS = [0.0, 0.005, 0.0050001, 0.003, 0.7, 1, 1.0000001, 29.9, 1800, 1800.5, 1e9, 0.25]


def _without_created(text: bytes) -> str:
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text.decode())


def test_the_text_is_prometheus_clients_for_the_same_updates() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    c1 = Counter("x_requests", "Requests.", ["route", "status"], registry=theirs)
    h1 = Histogram("x_seconds", "Time.", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    g1 = Gauge("x_active", "Now.", ["route"], registry=theirs)
    c2 = TallyCounter("x_requests", "Requests.", ["route", "status"], ours)
    h2 = TallyHistogram("x_seconds", "Time.", ["route"], ours, buckets=LATENCY_BUCKETS)
    g2 = TallyGauge("x_active", "Now.", ["route"], ours)
    for i, amount in enumerate(AMOUNTS):
        route = ("a", "b")[i % 2]
        for c in (c1, c2):
            c.labels(route, str(200 + i % 3)).inc()
            c.labels(route, "500").inc(3)
        for h in (h1, h2):
            h.labels(route).observe(amount)
        for g in (g1, g2):
            g.labels(route).inc()
            if i % 3:
                g.labels(route).dec()
    expected = _without_created(generate_latest(theirs))
    assert 'x_seconds_bucket{le="+Inf",route="a"}' in expected
    assert _without_created(generate_latest(ours)) == expected
    # and the registry reads single samples the same way (the tests' metric() helper)
    for name, labels in [
        ("x_requests_total", {"route": "a", "status": "500"}),
        ("x_seconds_count", {"route": "b"}),
        ("x_seconds_sum", {"route": "a"}),
        ("x_seconds_bucket", {"route": "a", "le": "1.0"}),
        ("x_active", {"route": "b"}),
    ]:
        assert ours.get_sample_value(name, labels) == theirs.get_sample_value(name, labels)


def test_a_counter_refuses_a_negative_amount_and_a_name_cannot_be_registered_twice() -> None:
    registry = CollectorRegistry()
    counter = TallyCounter("x_tokens", "Tokens.", ["kind"], registry)
    with pytest.raises(ValueError):
        counter.labels("prompt").inc(-1)
    assert registry.get_sample_value("x_tokens_total", {"kind": "prompt"}) == 0
    with pytest.raises(ValueError):
        Counter("x_tokens", "Again.", registry=registry)


def test_the_gateways_metrics_are_exported_with_help_type_and_created() -> None:
    metrics = Metrics()
    metrics.child(metrics.requests, "chat", "200").inc()
    metrics.child(metrics.duration, "chat").observe(0.02)
    text = generate_latest(metrics.registry).decode()
    assert "# HELP gateway_requests_total Requests answered, by route and HTTP status." in text
    assert "# TYPE gateway_requests_total counter" in text
    assert 'gateway_requests_total{route="chat",status="200"} 1.0' in text
    assert 'gateway_requests_created{route="chat",status="200"} ' in text
    assert "# TYPE gateway_request_duration_seconds histogram" in text
    assert 'gateway_request_duration_seconds_bucket{le="0.025",route="chat"} 1.0' in text
    assert 'gateway_request_duration_seconds_bucket{le="0.01",route="chat"} 0.0' in text
    assert 'gateway_request_duration_seconds_created{route="chat"} ' in text
