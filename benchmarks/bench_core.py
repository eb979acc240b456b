"""Core overhead: a push/pop pair, a trivial request, a proxy access; bare and instrumented.

Run: ``python benchmarks/bench_core.py [--rounds N] [--loops N]``. Each cell runs in
a fresh process; the table reports ratios against bare Flask from the same run.

``--configs`` adds configurations; those for telemetry install OpenTelemetry SDK
providers globally, as a production app has them (a batch span processor and a
metric reader collecting every second, both into exporters that drop the data):

- ``core``: ctxtrace with spans off and no metrics (the ledger and hooks alone);
- ``sdk``: bare Flask with those providers (they cost nothing while unused);
- ``default``: ctxtrace with its defaults (spans only for anomalies, metrics through
  the app's MeterProvider, the duration histogram fed by the drain thread);
- ``spans_all``: ``CTXTRACE_SPANS=all``, every context a sampled span;
- ``otel_flask``: OpenTelemetry's own Flask instrumentation, everything sampled.

e.g. ``python benchmarks/bench_core.py --rounds 3 --workloads request
--configs bare,sdk,core,default,spans_all,otel_flask --clock cpu``.

``--clock cpu`` times with the process's CPU time (every thread of it: the drain
and export threads count too) instead of the wall clock: steadier on a machine
that other jobs keep busy, and it charges background work to the configuration
that causes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from harness import report, run_cells, time_loop

CONFIGS = ("bare", "ctxtrace")
TELEMETRY_CONFIGS = ("sdk", "default", "spans_all", "otel_flask")
EXTRA_CONFIGS = ("core", *TELEMETRY_CONFIGS)
WORKLOADS = ("push_pop", "request", "proxy_access", "failed_access")


def _install_sdk_providers() -> None:
    """Global SDK providers whose exporters drop everything (the export cost is not ours)."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class NullSpans(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class NullMetrics(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kw: Any) -> Any:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kw: Any) -> None:
            return None

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(NullSpans()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(NullMetrics(), export_interval_millis=1000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def _app() -> Any:
    from flask import Flask

    app = Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    return app


def _environ() -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder(path="/").get_environ()


def _workload(name: str, app: Any) -> Callable[[], object]:
    from flask import current_app

    if name == "push_pop":
        def body() -> None:
            with app.app_context():
                pass
        return body
    if name == "request":
        environ = _environ()

        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
            return None

        def request() -> None:
            for _ in app(dict(environ), start_response):
                pass
        return request
    if name == "proxy_access":
        ctx = app.app_context()
        ctx.push()
        return lambda: current_app.name
    if name == "failed_access":
        def failed() -> None:
            try:  # noqa: SIM105 - suppress() would add its own cost to what is measured
                current_app.name  # noqa: B018
            except RuntimeError:
                pass
        return failed
    raise SystemExit(f"unknown workload {name}")


def worker(config: str, workload: str, loops: int) -> None:
    if config in TELEMETRY_CONFIGS:
        _install_sdk_providers()
    if config in ("ctxtrace", "core", "default", "spans_all"):
        import ctxtrace

        options: dict[str, Any] = {"log_rate_window": "off"}
        if config in ("ctxtrace", "core"):
            options["metrics"] = "none"
        if config == "core":
            options["spans"] = "off"
        if config == "spans_all":
            options["spans"] = "all"
        ctxtrace.instrument(**options)
        import structlog

        structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    app = _app()
    if config == "otel_flask":
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app)
    body = _workload(workload, app)
    for _ in range(min(loops, 2000)):
        body()
    if os.environ.get("BENCH_CLOCK") == "cpu":
        print(json.dumps({"ns": _cpu_time_loop(body, loops)}))
    else:
        print(json.dumps({"ns": time_loop(body, loops)}))


def _cpu_time_loop(body: Callable[[], object], loops: int) -> float:
    """CPU nanoseconds of the whole process per call of ``body``, best of three batches."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time_ns()
        for _ in range(loops):
            body()
        best = min(best, (time.process_time_ns() - start) / loops)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20_000)
    parser.add_argument(
        "--configs", default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS + EXTRA_CONFIGS)}",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    if args.clock == "cpu":
        os.environ["BENCH_CLOCK"] = "cpu"  # read by the worker processes
    if args.worker:
        config, workload, loops = args.worker
        worker(config, workload, int(loops))
        return
    configs = tuple(c for c in args.configs.split(",") if c)
    if "bare" not in configs:
        configs = ("bare", *configs)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    cells = run_cells(__file__, configs, workloads, args.rounds, args.loops)
    print(report(cells, "bare"))


if __name__ == "__main__":
    main()
