"""Prometheus expositions as sets of series, for comparing one scrape with another."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: A series (sample name and sorted labels) and its value.
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def series(text: str) -> Series:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class _Small(Collector):
    def __init__(self, count: float) -> None:
        self.count = count

    def collect(self) -> Iterator[Metric]:
        contexts = CounterMetricFamily("ctxtrace_contexts", "pushed", labels=["kind"])
        contexts.add_metric(["request"], self.count)
        yield contexts
        start = GaugeMetricFamily("process_start_time_seconds", "start")
        start.add_metric([], self.count)
        yield start


def small_registry(count: float) -> CollectorRegistry:
    """A counter of ``count`` requests (no worker label) and a start time of ``count``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Small(count))
    return registry
