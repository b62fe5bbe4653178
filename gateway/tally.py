"""Counters, gauges and histograms kept as plain numbers, exported at scrape time.

A prometheus_client child takes a lock on every ``inc()`` and its histogram walks the buckets
one comparison at a time: the per-request path makes five to seven such calls (~38k of ~555k
instructions per proxied request, callgrind, S3). Every update here is made on the event loop
and so is every scrape (``/metrics`` is served by the same loop), so a plain attribute is
enough; the exported text is the one prometheus_client writes for the same updates (names,
HELP and TYPE, samples and their order, ``le`` labels, ``_created``), held to it by
``tests/test_tally.py``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CounterSeries:
    """One labelled counter: ``inc()`` as prometheus_client's, without the lock."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # prometheus_client's own refusal, kept
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeSeries:
    """One labelled gauge: ``inc()`` and ``dec()``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class HistogramSeries:
    """One labelled histogram: a count per bucket (made cumulative at scrape) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # without +Inf: the last count is the +Inf bucket's own
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # prometheus_client counts an observation in the first bucket with amount <= bound
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    kind = ""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labels)
        self._series: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield self._family()  # the names, so the registry refuses a duplicate as it would

    def _family(self) -> Metric:
        raise NotImplementedError


class TallyCounter(_Family):
    """A labelled counter family whose series are :class:`CounterSeries`."""

    def labels(self, *values: str) -> CounterSeries:
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = CounterSeries()
        assert isinstance(found, CounterSeries)
        return found

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in self._series.items():
            assert isinstance(series, CounterSeries)
            family.add_metric(values, series.value, created=series.created)
        yield family


class TallyGauge(_Family):
    """A labelled gauge family whose series are :class:`GaugeSeries`."""

    def labels(self, *values: str) -> GaugeSeries:
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = GaugeSeries()
        assert isinstance(found, GaugeSeries)
        return found

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in self._series.items():
            assert isinstance(series, GaugeSeries)
            family.add_metric(values, series.value)
        yield family


class TallyHistogram(_Family):
    """A labelled histogram family whose series are :class:`HistogramSeries`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in (*self.bounds, float("inf"))]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labels, registry)

    def labels(self, *values: str) -> HistogramSeries:
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = HistogramSeries(self.bounds)
        assert isinstance(found, HistogramSeries)
        return found

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, series in self._series.items():
            assert isinstance(series, HistogramSeries)
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, series.sum)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.samples.append(Sample(self.name + "_created", labels, series.created, None))
        yield family
