"""Private OpenTelemetry SDK providers: what ``_providers`` builds when the app has none.

Built with ``shutdown_on_exit=False``, and push readers without a thread of
their own: ctxtrace collects, flushes and shuts them down itself, within a
bounded time, and a forked child drops the copies it inherited without
exporting the parent's data a second time. Every exporter is wrapped so that
its failures are counted in ``Agent.errors`` and never raised.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
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

from ctxtrace._config import Config
from ctxtrace.core.guard import run_within
from ctxtrace.telemetry.providers import (
    OTEL_METRIC_EXPORT_INTERVAL,
    OTEL_METRIC_EXPORT_TIMEOUT,
    RecordError,
    entry_point_name,
    metric_exporter_names,
    trace_exporter_names,
)

if TYPE_CHECKING:
    from ctxtrace.telemetry.hostscrape import HostScrape
    from ctxtrace.telemetry.prometheus import Endpoint, WorkerLabelled


class ExportFailed(RuntimeError):
    """An exporter reported failure (it did not raise); counted like an exception."""


def load_exporter(name: str, signal: str, environ: Mapping[str, str]) -> Any:
    """The exporter class an ``opentelemetry_<signal>_exporter`` entry point names."""
    group = f"opentelemetry_{signal}_exporter"
    wanted = entry_point_name(name, signal, environ)
    for entry in entry_points(group=group, name=wanted):
        return entry.load()
    raise LookupError(f"no {group} entry point named {wanted!r} (is its package installed?)")


#: The resource last detected in this process (or, before a fork, in its parent).
_last_resource: Resource | None = None


def resource(worker: str) -> Resource:
    """The environment's resource, with this worker as ``service.instance.id``.

    The SDK runs its detectors on a thread pool, which a process at interpreter
    exit can no longer start; a forked worker that ends before its first tick
    builds its provider then, to hand over its last counts. It takes the resource
    last detected (here or in its parent) with its own instance id.
    """
    global _last_resource
    instance = Resource({"service.instance.id": worker})
    try:
        _last_resource = Resource.create(dict(instance.attributes))
    except RuntimeError:
        if _last_resource is None:
            raise
        return _last_resource.merge(instance)
    return _last_resource


# -- guarded exporters ------------------------------------------------------------


class _Exporting(threading.local):
    """Whether this thread is inside one of ctxtrace's exports, and what the SDK said."""

    active = False
    said: str | None = None


_exporting = _Exporting()


class _QuietWhileExporting(logging.Filter):
    """Holds back the SDK's log records about ctxtrace's own exports.

    The SDK's exporters log every failed batch and every retry: one line per
    export while a collector is down. For ctxtrace's private exporters the
    guard counts each failure and logs the first (with the SDK's words as its
    message); the application's own exporters, on other threads, log as ever.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _exporting.active:
            return True
        if _exporting.said is None:
            try:
                _exporting.said = record.getMessage()[:200]
            except Exception:
                _exporting.said = str(record.msg)[:200]
        return False


_QUIET = _QuietWhileExporting()


def _quiet_loggers(inner: object) -> None:
    """Put the filter on the loggers of the modules an exporter's class comes from."""
    names = {cls.__module__ for cls in type(inner).__mro__ if cls.__module__ != "builtins"}
    names.add("opentelemetry.exporter.otlp.common.http")
    for name in names:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


class _Guard:
    """What both guarded exporters share: the component, the quiet export, abort."""

    def __init__(self, inner: Any, component: str, record: RecordError) -> None:
        self.inner = inner
        self._component = component
        self._record = record
        self.aborted = False
        _quiet_loggers(inner)

    def _export(self, call: Callable[[], Any], success: Any, failure: Any, what: str) -> Any:
        if self.aborted:
            # Past the stop's deadline: what is left goes, without a wait or a line.
            return failure
        _exporting.active, _exporting.said = True, None
        try:
            result = call()
        except Exception as exc:
            self._record(self._component, exc)
            return failure
        finally:
            _exporting.active = False
        if result is not success:
            said = f": {_exporting.said}" if _exporting.said else ""
            self._record(self._component, ExportFailed(f"{what} not exported{said}"))
        return result

    def _shutdown(self, call: Callable[[], Any]) -> None:
        if self.aborted:
            return  # already shut down by abort()
        try:
            call()
        except Exception as exc:
            self._record(self._component, exc)

    def abort(self) -> None:
        """Stop exporting now: later batches are dropped, retries end (stop timed out)."""
        self.aborted = True
        try:
            self.inner.shutdown()
        except Exception as exc:
            self._record(self._component, exc)


class GuardedSpanExporter(_Guard, SpanExporter):
    """A SpanExporter whose failures are counted under ``component`` and never raised."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        result: SpanExportResult = self._export(
            lambda: self.inner.export(spans), SpanExportResult.SUCCESS,
            SpanExportResult.FAILURE, f"{len(spans)} spans",
        )
        return result

    def shutdown(self) -> None:
        self._shutdown(self.inner.shutdown)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception as exc:
            self._record(self._component, exc)
            return False


class GuardedMetricExporter(_Guard, MetricExporter):
    """A MetricExporter whose failures are counted under ``component`` and never raised."""

    def __init__(self, inner: MetricExporter, component: str, record: RecordError) -> None:
        # The periodic reader reads an exporter's preferences from these two
        # attributes (the SDK's own convention): pass the wrapped exporter's on.
        MetricExporter.__init__(
            self,
            preferred_temporality=dict(getattr(inner, "_preferred_temporality", None) or {}),
            preferred_aggregation=dict(getattr(inner, "_preferred_aggregation", None) or {}),
        )
        _Guard.__init__(self, inner, component, record)

    def export(
        self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result: MetricExportResult = self._export(
            lambda: self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs),
            MetricExportResult.SUCCESS, MetricExportResult.FAILURE, "metrics",
        )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis=timeout_millis))
        except Exception as exc:
            self._record(self._component, exc)
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._shutdown(lambda: self.inner.shutdown(timeout_millis=timeout_millis, **kwargs))


# -- private tracing --------------------------------------------------------------


class _InOurQueue(threading.local):
    """Whether this thread is handing a span to one of ctxtrace's batch queues."""

    active = False


_in_our_queue = _InOurQueue()


class _QuietWhileQueueing(logging.Filter):
    """Holds back the SDK's "Queue full, dropping Span." for ctxtrace's own queues:
    ctxtrace counts those drops (``ctxtrace_dropped_total{what="span"}``) and says so
    once; the application's own processors log as ever."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _in_our_queue.active


_QUIET_QUEUE = _QuietWhileQueueing()


class CountingSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue turns away.

    The SDK drops a span when its queue is full (a collector down or hanging)
    and logs a line for each. Here the queue's length is read before each span
    goes in: a full queue means this span pushes one out, and ``dropped`` is
    called. Where the SDK's queue is not a bounded deque (another SDK version),
    nothing is counted (the README says so).
    """

    def __init__(self, exporter: SpanExporter, dropped: Callable[[], object]) -> None:
        super().__init__(exporter)
        self._dropped = dropped
        inner = getattr(self, "_batch_processor", self)
        queue = getattr(inner, "_queue", None)
        self._queue = queue if isinstance(queue, collections.deque) and queue.maxlen else None
        logger = logging.getLogger(type(inner).__module__)
        if _QUIET_QUEUE not in logger.filters:
            logger.addFilter(_QUIET_QUEUE)

    def on_end(self, span: Any) -> None:
        queue = self._queue
        if (
            queue is not None
            and len(queue) >= (queue.maxlen or 0)
            and span.context is not None
            and span.context.trace_flags.sampled
        ):
            with contextlib.suppress(Exception):
                self._dropped()
        _in_our_queue.active = True
        try:
            super().on_end(span)
        finally:
            _in_our_queue.active = False


class _Owned:
    """What a private provider's flush and shutdown share: a budget, kept.

    The SDK's exporters retry within their own timeouts (10 s by default, per
    batch) and its span processor's flush ignores the one it is given: with a
    collector down or hanging, a flush at exit could take minutes. Here each
    runs on a thread of its own and is waited for within the budget; a shutdown
    that overruns it aborts the exporters, so nothing else is sent or retried.
    """

    component = "telemetry"

    def __init__(self, exporters: Sequence[_Guard], record: RecordError) -> None:
        self.exporters = list(exporters)
        self.record = record

    def _within(self, timeout_s: float, work: Callable[[], object], *, closing: bool) -> None:
        if run_within(timeout_s, work, self.component, self.record) or not closing:
            return
        for exporter in self.exporters:
            exporter.abort()
        self.record(
            self.component,
            TimeoutError(
                f"shutdown did not finish within the {timeout_s:.3g} s left to it;"
                " what was not exported is dropped"
            ),
        )


class PrivateTracing(_Owned):
    """A TracerProvider ctxtrace built for itself, with its batch processors."""

    component = "spans"

    def __init__(
        self,
        provider: TracerProvider,
        exporters: Sequence[_Guard] = (),
        record: RecordError = lambda component, exc: None,
    ) -> None:
        super().__init__(exporters, record)
        self.provider = provider

    def flush(self, timeout_s: float) -> None:
        millis = int(max(timeout_s, 0.0) * 1000)
        self._within(timeout_s, lambda: self.provider.force_flush(millis), closing=False)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Export what is queued and stop, within ``timeout_s``."""
        self._within(timeout_s, self.provider.shutdown, closing=True)


def build_tracing(
    worker: str, environ: Mapping[str, str], record: RecordError,
    dropped: Callable[[], object] = lambda: None,
) -> PrivateTracing | None:
    """A private TracerProvider for the exporters the environment names, or ``None``."""
    names = trace_exporter_names(environ)
    provider = TracerProvider(resource=resource(worker), shutdown_on_exit=False)
    guarded: list[_Guard] = []
    for name in names:
        component = f"exporter.traces.{name}"
        try:
            inner = load_exporter(name, "traces", environ)()
            exporter = GuardedSpanExporter(inner, component, record)
            provider.add_span_processor(CountingSpanProcessor(exporter, dropped))
            guarded.append(exporter)
        except Exception as exc:
            record(component, exc)
    if not guarded:
        provider.shutdown()
        return None
    return PrivateTracing(provider, guarded, record)


# -- private metrics --------------------------------------------------------------


def _millis(environ: Mapping[str, str], key: str, default: float) -> float:
    try:
        value = float(environ.get(key, default))
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


class PrivateMetrics(_Owned):
    """A MeterProvider ctxtrace built for itself: readers, endpoints, push schedule."""

    component = "metrics"

    def __init__(
        self,
        provider: MeterProvider,
        push_readers: list[PeriodicExportingMetricReader],
        endpoint: Endpoint | None,
        interval_s: float,
        timeout_s: float,
        prometheus_reader: MetricReader | None = None,
        exporters: Sequence[_Guard] = (),
        record: RecordError = lambda component, exc: None,
        host_scrape: HostScrape | None = None,
        labelled: WorkerLabelled | None = None,
    ) -> None:
        super().__init__(exporters, record)
        self.provider = provider
        self.push_readers = push_readers
        self.endpoint = endpoint
        self.host_scrape = host_scrape
        #: What the Prometheus endpoints serve, with the worker label they add.
        self.labelled = labelled
        self.prometheus_reader = prometheus_reader
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    def push(self, timeout_s: float | None = None) -> None:
        """Collect and export once on every push reader (OTLP, console), and write this
        process's file for the host's address."""
        millis = (self.timeout_s if timeout_s is None else max(timeout_s, 0.001)) * 1000
        for reader in self.push_readers:
            reader.collect(timeout_millis=millis)
        if self.host_scrape is not None:
            self.host_scrape.write()

    def announce(self, config: Config) -> None:
        """Tell Prometheus where the endpoint is: call once the instruments exist."""
        from ctxtrace.telemetry import prometheus  # noqa: PLC0415 - loaded with the endpoint

        endpoint, labelled = self.endpoint, self.labelled
        if endpoint is None or labelled is None:
            return
        try:
            prometheus.announce(endpoint, labelled.worker, config)
        except OSError as exc:
            # The endpoint serves on without its file: Prometheus can still be
            # pointed at it.
            self.record("exporter.metrics.prometheus", exc)

    def flush(self, timeout_s: float) -> None:
        """``push`` within ``timeout_s``, however long the exporters take."""
        self._within(timeout_s, lambda: self.push(timeout_s), closing=False)

    def shutdown(self, timeout_s: float) -> None:
        """Final push, then stop serving and close everything, within about ``timeout_s``."""
        millis = max(timeout_s, 0.001) * 1000

        def push_and_close() -> None:
            try:
                self.push(timeout_s)
            finally:
                self.provider.shutdown(timeout_millis=millis)

        try:
            self._within(timeout_s, push_and_close, closing=True)
        finally:
            # Here, not on that thread: the port is free once this returns.
            if self.endpoint is not None:
                self.endpoint.close()
            if self.host_scrape is not None:
                self.host_scrape.close()

    def abandon_inherited(self) -> None:
        """In a forked child, after the fork: drop the parent's copy, export nothing."""
        if self.endpoint is not None:
            self.endpoint.abandon()
        if self.host_scrape is not None:
            self.host_scrape.close()  # in a child: descriptors only, the files are the parent's
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
    host_scrape: HostScrape | None = None
    labelled: WorkerLabelled | None = None
    pull: MetricReader | None = None
    guarded: list[_Guard] = []
    timeout_ms = _millis(environ, OTEL_METRIC_EXPORT_TIMEOUT, 30_000.0)
    for name in names:
        component = f"exporter.metrics.{name}"
        try:
            if name == "prometheus":
                if pull is None:
                    pull, labelled, endpoint, host_scrape = _prometheus(worker, config, record)
                    readers.append(pull)
                continue
            exporter = GuardedMetricExporter(
                load_exporter(name, "metrics", environ)(), component, record
            )
            # No interval: no thread of the SDK's own; ctxtrace's thread pushes.
            push = PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=math.inf,
                export_timeout_millis=timeout_ms,
            )
            readers.append(push)
            push_readers.append(push)
            guarded.append(exporter)
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
        exporters=guarded,
        record=record,
        host_scrape=host_scrape,
        labelled=labelled,
    )


def _prometheus(
    worker: str, config: Config, record: RecordError
) -> tuple[MetricReader, WorkerLabelled, Endpoint | None, HostScrape | None]:
    """The Prometheus reader, and what serves it (``CTXTRACE_PROMETHEUS_SCRAPE``).

    The host's address first: in ``both`` the first process takes the first port.
    """
    # prometheus_client loads only for this exporter.
    from ctxtrace.telemetry import hostscrape, prometheus  # noqa: PLC0415

    labelled, pull = prometheus.reader(worker)
    host_scrape: HostScrape | None = None
    endpoint: Endpoint | None = None
    try:
        if config.prometheus_scrape in ("host", "both"):
            host_scrape = hostscrape.HostScrape(labelled, config, record)
        if config.prometheus_scrape in ("worker", "both"):
            endpoint = prometheus.serve(labelled, config)
    except BaseException:
        if host_scrape is not None:
            host_scrape.close()
        pull.shutdown()
        raise
    return pull, labelled, endpoint, host_scrape
