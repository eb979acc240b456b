"""Private OpenTelemetry SDK providers: what ``_providers`` builds when the app has none.

Built with ``shutdown_on_exit=False``, and push readers without a thread of
their own: ctxtrace collects, flushes and shuts them down itself, within a
bounded time, and a forked child drops the copies it inherited without
exporting the parent's data a second time. Every exporter is wrapped so that
its failures are counted in ``Agent.errors`` and never raised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from ._config import Config
from ._providers import (
    OTEL_METRIC_EXPORT_INTERVAL,
    OTEL_METRIC_EXPORT_TIMEOUT,
    RecordError,
    entry_point_name,
    metric_exporter_names,
    trace_exporter_names,
)

if TYPE_CHECKING:
    from ._prometheus import Endpoint


class ExportFailed(RuntimeError):
    """An exporter reported failure (it did not raise); counted like an exception."""


def load_exporter(name: str, signal: str, environ: Mapping[str, str]) -> Any:
    """The exporter class an ``opentelemetry_<signal>_exporter`` entry point names."""
    group = f"opentelemetry_{signal}_exporter"
    wanted = entry_point_name(name, signal, environ)
    for entry in entry_points(group=group, name=wanted):
        return entry.load()
    raise LookupError(f"no {group} entry point named {wanted!r} (is its package installed?)")


def resource(worker: str) -> Resource:
    """The environment's resource, with this worker as ``service.instance.id``."""
    return Resource.create({"service.instance.id": worker})


# -- guarded exporters ------------------------------------------------------------


class GuardedSpanExporter(SpanExporter):
    """A SpanExporter whose failures are counted under ``component`` and never raised."""

    def __init__(self, inner: SpanExporter, component: str, record: RecordError) -> None:
        self.inner = inner
        self._component = component
        self._record = record

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            self._record(self._component, exc)
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._record(self._component, ExportFailed(f"{len(spans)} spans not exported"))
        return result

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as exc:
            self._record(self._component, exc)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception as exc:
            self._record(self._component, exc)
            return False


class GuardedMetricExporter(MetricExporter):
    """A MetricExporter whose failures are counted under ``component`` and never raised."""

    def __init__(self, inner: MetricExporter, component: str, record: RecordError) -> None:
        # The periodic reader reads an exporter's preferences from these two
        # attributes (the SDK's own convention): pass the wrapped exporter's on.
        super().__init__(
            preferred_temporality=dict(getattr(inner, "_preferred_temporality", None) or {}),
            preferred_aggregation=dict(getattr(inner, "_preferred_aggregation", None) or {}),
        )
        self.inner = inner
        self._component = component
        self._record = record

    def export(
        self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self._record(self._component, exc)
            return MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._record(self._component, ExportFailed("metrics not exported"))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis=timeout_millis))
        except Exception as exc:
            self._record(self._component, exc)
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        try:
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self._record(self._component, exc)


# -- private tracing --------------------------------------------------------------


class PrivateTracing:
    """A TracerProvider ctxtrace built for itself, with its batch processors."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def flush(self, timeout_s: float) -> None:
        self.provider.force_flush(int(max(timeout_s, 0.0) * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def build_tracing(
    worker: str, environ: Mapping[str, str], record: RecordError
) -> PrivateTracing | None:
    """A private TracerProvider for the exporters the environment names, or ``None``."""
    names = trace_exporter_names(environ)
    provider = TracerProvider(resource=resource(worker), shutdown_on_exit=False)
    added = 0
    for name in names:
        component = f"exporter.traces.{name}"
        try:
            exporter = load_exporter(name, "traces", environ)()
            provider.add_span_processor(
                BatchSpanProcessor(GuardedSpanExporter(exporter, component, record))
            )
            added += 1
        except Exception as exc:
            record(component, exc)
    if not added:
        provider.shutdown()
        return None
    return PrivateTracing(provider)


# -- private metrics --------------------------------------------------------------


def _millis(environ: Mapping[str, str], key: str, default: float) -> float:
    try:
        value = float(environ.get(key, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


class PrivateMetrics:
    """A MeterProvider ctxtrace built for itself: readers, endpoint, push schedule."""

    def __init__(
        self,
        provider: MeterProvider,
        push_readers: list[PeriodicExportingMetricReader],
        endpoint: Endpoint | None,
        interval_s: float,
        timeout_s: float,
        prometheus_reader: MetricReader | None = None,
    ) -> None:
        self.provider = provider
        self.push_readers = push_readers
        self.endpoint = endpoint
        self.prometheus_reader = prometheus_reader
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    def push(self, timeout_s: float | None = None) -> None:
        """Collect and export once on every push reader (OTLP, console)."""
        millis = (self.timeout_s if timeout_s is None else max(timeout_s, 0.001)) * 1000
        for reader in self.push_readers:
            reader.collect(timeout_millis=millis)

    def shutdown(self, timeout_s: float) -> None:
        """Final push, then stop serving and close everything (bounded by the exporters)."""
        try:
            self.push(timeout_s)
        finally:
            if self.endpoint is not None:
                self.endpoint.close()
            self.provider.shutdown(timeout_millis=max(timeout_s, 0.001) * 1000)

    def abandon_inherited(self) -> None:
        """In a forked child, after the fork: drop the parent's copy, export nothing."""
        if self.endpoint is not None:
            self.endpoint.abandon()
        if self.prometheus_reader is not None:
            # Only unregisters its collector from its registry: no collection.
            self.prometheus_reader.shutdown()


def build_metrics(
    worker: str,
    config: Config,
    environ: Mapping[str, str],
    record: RecordError,
) -> PrivateMetrics | None:
    """A private MeterProvider for the chosen exporters, or ``None`` for none."""
    names = metric_exporter_names(config, environ)
    readers: list[MetricReader] = []
    push_readers: list[PeriodicExportingMetricReader] = []
    endpoint: Endpoint | None = None
    pull: MetricReader | None = None
    timeout_ms = _millis(environ, OTEL_METRIC_EXPORT_TIMEOUT, 30_000.0)
    for name in names:
        component = f"exporter.metrics.{name}"
        try:
            if name == "prometheus":
                if endpoint is None:
                    # prometheus_client loads only for this exporter.
                    from ._prometheus import serve  # noqa: PLC0415

                    endpoint, pull = serve(worker, config)
                    readers.append(pull)
                continue
            exporter = load_exporter(name, "metrics", environ)()
            # No interval: no thread of the SDK's own; ctxtrace's thread pushes.
            push = PeriodicExportingMetricReader(
                GuardedMetricExporter(exporter, component, record),
                export_interval_millis=math.inf,
                export_timeout_millis=timeout_ms,
            )
            readers.append(push)
            push_readers.append(push)
        except Exception as exc:
            record(component, exc)
    if not readers:
        return None
    provider = MeterProvider(
        metric_readers=readers,
        resource=resource(worker),
        # ctxtrace records durations from a drain thread, never under a span.
        exemplar_filter=AlwaysOffExemplarFilter(),
        shutdown_on_exit=False,
    )
    return PrivateMetrics(
        provider,
        push_readers,
        endpoint,
        interval_s=_millis(environ, OTEL_METRIC_EXPORT_INTERVAL, 60_000.0) / 1000,
        timeout_s=timeout_ms / 1000,
        prometheus_reader=pull,
    )

