"""Spans the SDK's queue drops are counted, not logged line by line (issue 16, item 9).

Against a hanging collector the batch queue of ctxtrace's private provider
fills up and the SDK drops spans: each drop is counted in
``ctxtrace_dropped_total{what="span"}``, one ``ctxtrace.spans_dropped`` line
says so, and the SDK's "Queue full, dropping Span." lines stay quiet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from ctxtrace import _agent
from ctxtrace.telemetry import metrics as _metrics

from .._otlp import Receiver

SPANS = 200
QUEUE = 20


@pytest.fixture
def hanging(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """An OTLP collector that takes 20 s to answer, and a small span queue."""
    server = Receiver(delay=20)
    for name, value in {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": server.url,
        "OTEL_BSP_MAX_QUEUE_SIZE": str(QUEUE),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    yield server
    server.close()


def test_queue_drops_are_counted_and_said_once(
    hanging: Receiver, instrumented: Any, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """200 anomaly spans into a queue of 20 before a hanging collector: drops counted."""
    instrumented(metrics="none")
    agent = _agent.current()
    assert agent is not None
    app = Flask("shop")
    caplog.set_level(logging.WARNING)
    for _ in range(SPANS):
        ctx = app.app_context()
        ctx.push()
        ctx.pop()
        with contextlib.suppress(AssertionError, LookupError, RuntimeError, ValueError):
            ctx.pop()  # a double pop: one anomaly span each
    metrics = _metrics.MetricsEmitter(agent, dropped_spans=lambda: _span_drops(agent))
    dropped = metrics.dropped()["span"]
    assert SPANS - QUEUE - 20 <= dropped <= SPANS, dropped
    assert not [r for r in caplog.records if "Queue full" in r.getMessage()]
    said = [
        json.loads(line) for line in capsys.readouterr().err.splitlines()
        if '"ctxtrace.spans_dropped"' in line
    ]
    assert len(said) == 1


def _span_drops(agent: Any) -> int:
    from ctxtrace.telemetry import spans as _spans  # noqa: PLC0415

    emitter = next(e for e in agent.emitters if isinstance(e, _spans.SpanEmitter))
    return int(emitter.dropped)


def test_the_applications_own_queue_still_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only ctxtrace's queues are quiet: the application's processor logs its drops as ever."""
    # The SDK's own filter drops a line equal to the one before (within 20 s): out of the
    # way here, or an earlier test's line would hide this one.
    sdk_logger = logging.getLogger("opentelemetry.sdk._shared_internal")
    kept = [f for f in sdk_logger.filters if type(f).__name__ != "DuplicateFilter"]
    monkeypatch.setattr(sdk_logger, "filters", kept)
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    from ctxtrace.telemetry import sdk_providers as _sdk_providers  # noqa: PLC0415

    _sdk_providers.CountingSpanProcessor(InMemorySpanExporter(), lambda: None).shutdown()
    release = threading.Event()

    class Stuck(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(Stuck(), max_queue_size=1, max_export_batch_size=1)
    )
    caplog.set_level(logging.WARNING)
    tracer = provider.get_tracer("app")
    try:
        for _ in range(6):  # the first is stuck in export, the queue holds one: drops
            with tracer.start_as_current_span("x"):
                pass
            time.sleep(0.05)
    finally:
        release.set()
        provider.shutdown()
    assert [r for r in caplog.records if "Queue full" in r.getMessage()]
