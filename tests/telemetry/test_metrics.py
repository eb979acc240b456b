"""Metrics: every instrument and label, exact under threads, histogram fed off the request path."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

import ctxtrace
from ctxtrace import _agent
from ctxtrace._events import ANOMALIES, PROXIES, OutOfContextAccess
from ctxtrace.telemetry import metrics as _metrics
from ctxtrace.telemetry import providers

Points = dict[str, list[tuple[dict[str, Any], Any]]]


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    """The application's MeterProvider, with an in-memory reader, handed to ctxtrace."""
    metric_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[metric_reader])
    monkeypatch.setitem(providers._explicit, "meter", provider)
    yield metric_reader
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> Points:
    """Every ctxtrace data point, by metric name: (attributes, value or histogram point)."""
    data = reader.get_metrics_data()
    points: Points = {}
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            if scope.scope.name != "ctxtrace":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = point if isinstance(point, HistogramDataPoint) else point.value
                    points.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return points


def value(points: Points, name: str, **labels: str) -> Any:
    matches = [
        v for attrs, v in points.get(name, []) if all(attrs.get(k) == x for k, x in labels.items())
    ]
    assert len(matches) == 1, (name, labels, points.get(name))
    return matches[0]


def worker() -> str:
    agent = _agent.current()
    assert agent is not None
    return agent.worker


def metrics_emitter() -> _metrics.MetricsEmitter:
    agent = _agent.current()
    assert agent is not None
    (emitter,) = [e for e in agent.emitters if isinstance(e, _metrics.MetricsEmitter)]
    return emitter


class Boom:
    """An emitter that always fails: the agent counts it as an internal error."""

    name = "boom"

    def handle(self, event: object) -> None:
        raise ValueError("boom")


def test_every_metric_and_label(
    instrumented: Any, reader: InMemoryMetricReader, app: Flask
) -> None:
    """Each metric exists with exactly its labels, and counts what happened."""
    instrumented(ledger_cap="16", log_rate_window="60")
    agent = _agent.current()
    assert agent is not None
    agent.subscribe(Boom())  # type: ignore[arg-type]
    client = app.test_client()
    for _ in range(3):
        assert client.get("/").status_code == 200
    with app.app_context(), app.app_context(), app.app_context():
        pass
    for _ in range(2):  # the same site twice: the second log line is rate-limited
        ctx = app.app_context()
        ctx.push()
        ctx.pop()
        with pytest.raises(LookupError):  # an empty stack: IndexError or LookupError
            ctx.pop()
    with pytest.raises(RuntimeError):
        current_app.name  # noqa: B018 - the failed access is the point
    agent.ledger.settle_now()  # outside any unit: told at the sweep, or now
    contexts = [app.app_context() for _ in range(17)]
    for ctx in contexts:
        ctx.push()
    for ctx in reversed(contexts):
        ctx.pop()

    points = collect(reader)
    me = worker()
    expected_labels = {
        "ctxtrace.contexts": {"kind", "app", "worker"},
        "ctxtrace.context.duration": {"kind", "app", "worker"},
        "ctxtrace.contexts.active": {"kind", "app", "worker"},
        "ctxtrace.context.depth_max": {"worker"},
        "ctxtrace.anomalies": {"anomaly", "kind", "app", "worker"},
        "ctxtrace.out_of_context_access": {"proxy", "phase", "outcome", "worker"},
        "ctxtrace.internal_errors": {"component", "worker"},
        "ctxtrace.dropped": {"what", "worker"},
    }
    assert set(points) == set(expected_labels)
    for name, labels in expected_labels.items():
        for attrs, _ in points[name]:
            assert set(attrs) == labels, name
            assert attrs["worker"] == me
    # 3 requests (each with Flask's own app context), 3 nested, 2 pushed twice by
    # hand, 16 of 17 under the cap.
    assert value(points, "ctxtrace.contexts", kind="request", app="shop") == 3
    assert value(points, "ctxtrace.contexts", kind="app", app="shop") == 3 + 3 + 2 + 16
    histogram = value(points, "ctxtrace.context.duration", kind="app", app="shop")
    assert histogram.count == 24 and histogram.sum > 0
    assert list(histogram.explicit_bounds) == list(_metrics.BUCKETS)
    assert value(points, "ctxtrace.context.duration", kind="request", app="shop").count == 3
    assert value(points, "ctxtrace.contexts.active", kind="app", app="shop") == 0
    assert value(points, "ctxtrace.context.depth_max") == 16
    assert value(points, "ctxtrace.anomalies", anomaly="double_pop", kind="app", app="shop") == 2
    for anomaly in ANOMALIES:
        if anomaly != "double_pop":
            assert value(points, "ctxtrace.anomalies", anomaly=anomaly, kind="app", app="shop") == 0
    access = value(
        points, "ctxtrace.out_of_context_access", proxy="current_app", phase="runtime",
        outcome="handled",
    )
    assert access == 1
    assert len(points["ctxtrace.out_of_context_access"]) == len(PROXIES) * 2 * 2
    # One failure per event the failing emitter saw: 2 double pops and 1 access.
    assert value(points, "ctxtrace.internal_errors", component="boom") == 3
    assert value(points, "ctxtrace.dropped", what="context") == 1
    assert value(points, "ctxtrace.dropped", what="log") == 1
    assert value(points, "ctxtrace.dropped", what="duration") == 0
    assert value(points, "ctxtrace.dropped", what="span") == 0
    # A second reader within the window still sees the spike (an HA Prometheus pair).
    assert value(collect(reader), "ctxtrace.context.depth_max") == 16
    # Errors of the core pipeline are exported at 0 before any error happened.
    assert value(points, "ctxtrace.internal_errors", component="hooks") == 0


def test_active_contexts(instrumented: Any, reader: InMemoryMetricReader, app: Flask) -> None:
    """Pushed and not yet popped, per kind."""
    instrumented()
    with app.test_request_context("/"):
        points = collect(reader)
        assert value(points, "ctxtrace.contexts.active", kind="request", app="shop") == 1
        assert value(points, "ctxtrace.contexts.active", kind="app", app="shop") == 1
    points = collect(reader)
    assert value(points, "ctxtrace.contexts.active", kind="request", app="shop") == 0


def test_exact_under_eight_threads(
    instrumented: Any, reader: InMemoryMetricReader, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads pushing, popping, double-popping and failing lookups at once: nothing lost.

    The histogram's CPU budget is raised so that a slow machine records every lifetime.
    """
    monkeypatch.setattr(_metrics, "FEED_BURST_S", 60.0)
    instrumented()
    rounds, start = 300, threading.Barrier(8)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait(10)
            client = app.test_client()
            for i in range(rounds):
                with app.app_context():
                    pass
                if i % 10 == 0:
                    client.get("/")
                    ctx = app.app_context()
                    ctx.push()
                    ctx.pop()
                    with contextlib.suppress(LookupError):
                        ctx.pop()
                    with contextlib.suppress(RuntimeError):
                        current_app.name  # noqa: B018 - the failed access is the point
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"w{i}") for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    points = collect(reader)
    requests = 8 * rounds // 10
    pushed_app = 8 * rounds + requests + requests  # with-blocks, Flask's own, double-popped
    assert value(points, "ctxtrace.contexts", kind="app", app="shop") == pushed_app
    assert value(points, "ctxtrace.contexts", kind="request", app="shop") == requests
    assert value(points, "ctxtrace.context.duration", kind="app", app="shop").count == pushed_app
    assert value(points, "ctxtrace.context.duration", kind="request", app="shop").count == requests
    double_pops = value(points, "ctxtrace.anomalies", anomaly="double_pop", kind="app", app="shop")
    assert double_pops == requests
    access = value(
        points, "ctxtrace.out_of_context_access", proxy="current_app", phase="runtime",
        outcome="handled",
    )
    assert access == requests
    assert value(points, "ctxtrace.dropped", what="duration") == 0


def _pairs(app: Flask, count: int) -> None:
    """``count`` healthy app-context pushes and pops."""
    for _ in range(count):
        with app.app_context():
            pass


class TestDurationFeed:
    def test_drained_in_the_background(
        self, instrumented: Any, reader: InMemoryMetricReader, app: Flask
    ) -> None:
        """The drain thread records lifetimes without waiting for a collection."""
        instrumented()
        emitter = metrics_emitter()
        _pairs(app, 5)
        emitter.tick()
        assert emitter.feed.drain() == 0  # nothing left: the tick recorded all five

    def test_over_budget_is_dropped_and_counted(
        self,
        instrumented: Any,
        reader: InMemoryMetricReader,
        app: Flask,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Past the CPU budget lifetimes are not recorded; each one is counted as dropped.

        The budget is set to nothing to produce this without a flood of requests.
        """
        monkeypatch.setattr(_metrics, "FEED_CPU_SHARE", 0.0)
        instrumented()
        emitter = metrics_emitter()
        emitter.feed._tokens = 0.0
        _pairs(app, 40)
        emitter.tick()
        # The clock is read every 32 records: 32 recorded, then the budget is found spent.
        assert emitter.feed.over_budget == 8
        points = collect(reader)
        assert value(points, "ctxtrace.context.duration", kind="app", app="shop").count == 32
        assert value(points, "ctxtrace.dropped", what="duration") == 8
        assert value(points, "ctxtrace.contexts", kind="app", app="shop") == 40

    def test_losses_in_the_ledger_buffer_are_counted(
        self, instrumented: Any, reader: InMemoryMetricReader, app: Flask
    ) -> None:
        """Pops whose lifetime never reached the drain count as dropped durations."""
        instrumented()
        emitter = metrics_emitter()
        _pairs(app, 10)
        emitter.tick()
        # The ledger's buffer lost 3 of the next 5 (as a full buffer would).
        _pairs(app, 5)
        agent = _agent.current()
        assert agent is not None
        drained = agent.ledger.drain_durations()
        for _ in itertools.islice(drained, 3):
            pass
        drained.close()
        emitter.tick()
        emitter.tick()
        assert emitter.dropped()["duration"] == 3


def test_late_global_provider_is_adopted(
    instrumented: Any, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that sets its MeterProvider after ctxtrace started gets the metrics; the
    private endpoint goes."""
    instrumented(metrics="prometheus", prometheus_port="0")
    emitter = metrics_emitter()
    assert emitter.private is not None and emitter.private.endpoint is not None
    endpoint = emitter.private.endpoint
    late = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[late])
    monkeypatch.setitem(providers._explicit, "meter", provider)
    with app.app_context():
        pass
    emitter.tick()
    assert emitter.private is None and emitter.meter_provider is provider
    assert not endpoint.thread.is_alive()
    points = collect(late)
    assert value(points, "ctxtrace.contexts", kind="app", app="shop") == 1
    provider.shutdown()


def test_same_provider_across_restarts(
    instrumented: Any, reader: InMemoryMetricReader, app: Flask
) -> None:
    """Turning ctxtrace off and on again reads the new agent, not the old one."""
    instrumented()
    with app.app_context():
        pass
    ctxtrace.uninstrument()
    assert "ctxtrace.contexts" not in collect(reader) or not collect(reader)["ctxtrace.contexts"]
    instrumented()
    _pairs(app, 2)
    assert value(collect(reader), "ctxtrace.contexts", kind="app", app="shop") == 2


def test_after_fork_counts_from_zero(
    instrumented: Any, reader: InMemoryMetricReader, app: Flask
) -> None:
    """A forked child has its own worker label and counts only its own contexts."""
    instrumented()
    _pairs(app, 3)
    parent_worker = worker()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            with app.app_context():
                pass
            points = collect(reader)
            child = {
                "worker": worker(),
                "contexts": value(points, "ctxtrace.contexts", kind="app", app="shop"),
                "histogram": value(
                    points, "ctxtrace.context.duration", kind="app", app="shop"
                ).count,
                "pid": os.getpid(),
            }
            os.write(write_end, json.dumps(child).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read().decode())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child["worker"] != parent_worker and f":{child['pid']}:" in child["worker"]
    assert child["contexts"] == 1 and child["histogram"] == 1
    assert value(collect(reader), "ctxtrace.contexts", kind="app", app="shop") == 3


def test_depth_window_serves_every_reader_then_forgets() -> None:
    """A spike is seen by every reader for DEPTH_WINDOW_S seconds, and then no longer."""
    now = [1000.0]
    spikes = [5]
    window = _metrics.DepthWindow(lambda: spikes.pop() if spikes else 0, lambda: now[0])
    assert window.read() == 5
    now[0] += _metrics.DEPTH_SLOT_S
    assert window.read() == 5  # a second reader, a scrape later
    now[0] += _metrics.DEPTH_WINDOW_S
    assert window.read() == 0
    spikes.append(3)
    assert window.read() == 3


def test_repeated_failed_accesses_are_counted_exactly_without_a_line_each(
    instrumented: Any,
    reader: InMemoryMetricReader,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A fallback catching ``RuntimeError`` in a loop, in tasks and outside any unit: one
    line per outcome and site (the rest counted in its summary), every access in the metric."""
    recorder = instrumented(log_rate_window=60)
    agent = _agent.current()
    assert agent is not None
    for _ in range(4):
        handle = agent.begin_unit("task", "nightly")
        for _ in range(150):
            with contextlib.suppress(RuntimeError):
                current_app.name  # noqa: B018 - the failed access is the point
        agent.end_unit(handle)
    for _ in range(300):
        with contextlib.suppress(RuntimeError):
            current_app.name  # noqa: B018
    agent.ledger.settle_all()  # what the sweep or the stop would tell
    points = collect(reader)
    ctxtrace.uninstrument()
    handled = value(
        points, "ctxtrace.out_of_context_access", proxy="current_app", phase="runtime",
        outcome="handled",
    )
    assert handled == 4 * 150 + 300
    told = [e for e in recorder.events if isinstance(e, OutOfContextAccess)]
    assert [(e.summary, e.counted_since_last) for e in told] == [
        (False, 0), (False, 0), (True, 599), (True, 299),
    ]
    lines = [x for x in capsys.readouterr().err.splitlines() if "out_of_context_access" in x]
    assert len(lines) == 4
