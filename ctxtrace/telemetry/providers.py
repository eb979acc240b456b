"""Which OpenTelemetry providers ctxtrace uses, and how it builds its own.

- A global TracerProvider or MeterProvider that the application, a distro or
  ``opentelemetry-instrument`` set is used as it is and never replaced.
- Otherwise ctxtrace builds private providers from the OpenTelemetry
  environment (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``, ``OTEL_EXPORTER_OTLP_*``,
  ``OTEL_TRACES_SAMPLER``...) with the SDK's own exporters, and never sets the
  globals: the application's own telemetry is not ctxtrace's business.
- Spans leave the process only once an exporter is named: with nothing set,
  nothing may be listening on the OTLP port. Metrics default to the worker's
  own Prometheus endpoint (``CTXTRACE_METRICS``, else ``OTEL_METRICS_EXPORTER``).

Private providers are built with ``shutdown_on_exit=False`` and their push
readers without a thread of their own: ctxtrace collects, flushes and shuts
them down itself, within a bounded time, and a forked child drops the copies it
inherited without exporting the parent's data a second time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics, trace

# The API's stand-in until a MeterProvider is set; there is no public name for it.
from opentelemetry.metrics._internal import _ProxyMeterProvider

from ctxtrace._config import Config

if TYPE_CHECKING:
    from ctxtrace.telemetry.sdk_providers import PrivateMetrics, PrivateTracing

#: Comma-separated span exporters (``otlp``, ``console``, ``none``); unset means none.
OTEL_TRACES_EXPORTER: Final = "OTEL_TRACES_EXPORTER"
#: Comma-separated metric exporters (``prometheus``, ``otlp``, ``console``, ``none``).
OTEL_METRICS_EXPORTER: Final = "OTEL_METRICS_EXPORTER"
#: ``grpc`` or ``http/protobuf`` for every signal, unless the per-signal one is set.
OTEL_EXPORTER_OTLP_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_PROTOCOL"
#: Per-signal OTLP protocols.
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: Final = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
#: Milliseconds between pushes of the private push readers (OTLP, console); default 60000.
OTEL_METRIC_EXPORT_INTERVAL: Final = "OTEL_METRIC_EXPORT_INTERVAL"
#: Milliseconds one push may take; default 30000.
OTEL_METRIC_EXPORT_TIMEOUT: Final = "OTEL_METRIC_EXPORT_TIMEOUT"

SCOPE: Final = "ctxtrace"
_OTLP_BY_PROTOCOL: Final = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
_PROTOCOL_ENV: Final = {
    "traces": OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    "metrics": OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
}

RecordError = Callable[[str, BaseException], None]


# -- the application's providers, read only --------------------------------------

# Providers handed to ``CtxtraceInstrumentor().instrument(tracer_provider=...,
# meter_provider=...)``, as OpenTelemetry instrumentations accept them.
_explicit: dict[str, Any] = {"tracer": None, "meter": None}


def set_explicit(tracer_provider: Any, meter_provider: Any) -> None:
    """Providers given to the instrumentor; they win over the global ones."""
    _explicit["tracer"] = tracer_provider
    _explicit["meter"] = meter_provider


def global_tracer_provider() -> trace.TracerProvider | None:
    """The application's TracerProvider (given, or set globally), else ``None``."""
    explicit: trace.TracerProvider | None = _explicit["tracer"]
    if explicit is not None:
        return explicit
    provider = trace.get_tracer_provider()
    return None if isinstance(provider, trace.ProxyTracerProvider) else provider


def global_meter_provider() -> metrics.MeterProvider | None:
    """The application's MeterProvider (given, or set globally), else ``None``."""
    explicit: metrics.MeterProvider | None = _explicit["meter"]
    if explicit is not None:
        return explicit
    provider = metrics.get_meter_provider()
    return None if isinstance(provider, _ProxyMeterProvider) else provider


# -- choosing exporters ---------------------------------------------------------


def _names(value: str | None) -> list[str]:
    if not value or value.strip().lower() == "none":
        return []
    return [n.strip().lower() for n in value.split(",") if n.strip() and n.strip() != "none"]


def trace_exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters named in the environment; none unless named."""
    return _names(environ.get(OTEL_TRACES_EXPORTER))


def metric_exporter_names(config: Config, environ: Mapping[str, str]) -> list[str]:
    """``CTXTRACE_METRICS`` if set anywhere, else ``OTEL_METRICS_EXPORTER``, else prometheus."""
    if "metrics" in config.sources or OTEL_METRICS_EXPORTER not in environ:
        return [] if config.metrics == "none" else [config.metrics]
    return _names(environ.get(OTEL_METRICS_EXPORTER))


def entry_point_name(name: str, signal: str, environ: Mapping[str, str]) -> str:
    """``otlp`` means the protocol the environment names; the SDK's own rule.

    With no protocol named the SDK picks gRPC; ctxtrace does too when its
    exporter is installed, else HTTP/protobuf (the only one in its ``otlp``
    extra that needs no compiler).
    """
    if name != "otlp":
        return name
    protocol = environ.get(_PROTOCOL_ENV[signal]) or environ.get(OTEL_EXPORTER_OTLP_PROTOCOL)
    protocol = (protocol or "").strip()
    if protocol:
        if protocol not in _OTLP_BY_PROTOCOL:
            raise ValueError(f"unsupported OTLP protocol {protocol!r}")
        return _OTLP_BY_PROTOCOL[protocol]
    grpc = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None
    return _OTLP_BY_PROTOCOL["grpc" if grpc else "http/protobuf"]


def environ() -> Mapping[str, str]:
    """The process environment (a function, so tests can read it at call time)."""
    return os.environ


# -- building private providers (the SDK is imported only when one is built) ------
# A deliberate lazy cycle: ``sdk_providers`` reads this module's exporter names,
# and this module imports it only inside the two builders below, so an app with
# providers of its own (or none wanted) never loads the SDK's exporters.


def build_tracing(
    worker: str, environ: Mapping[str, str], record: RecordError,
    dropped: Callable[[], object] = lambda: None,
) -> PrivateTracing | None:
    """A private TracerProvider for the exporters the environment names, or ``None``.

    ``dropped`` is called for each span its batch queue turns away.
    """
    if not trace_exporter_names(environ):
        return None
    from ctxtrace.telemetry import sdk_providers  # noqa: PLC0415 - the SDK only loads when used

    return sdk_providers.build_tracing(worker, environ, record, dropped)


def build_metrics(
    worker: str, config: Config, environ: Mapping[str, str], record: RecordError
) -> PrivateMetrics | None:
    """A private MeterProvider for the chosen exporters, or ``None`` for none."""
    if not metric_exporter_names(config, environ):
        return None
    from ctxtrace.telemetry import sdk_providers  # noqa: PLC0415 - the SDK only loads when used

    return sdk_providers.build_metrics(worker, config, environ, record)
