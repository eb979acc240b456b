"""Exporters: OTLP over HTTP to a real receiver, the per-worker Prometheus endpoint, providers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app
from opentelemetry import metrics, trace
from prometheus_client.parser import text_string_to_metric_families

import ctxtrace
from ctxtrace import _agent
from ctxtrace.telemetry import metrics as _metrics
from ctxtrace.telemetry import prometheus as _prometheus
from ctxtrace.telemetry import spans as _spans

from .._otlp import Receiver, attributes
from .._servers import REPO

OTEL_ENV = (
    "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(clean_otel_env: None) -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _otlp_env(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shop-api")


def _scrape_names(port: int) -> Iterator[str]:
    """The sample names ``127.0.0.1:port/metrics`` serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name


def _double_pop(app: Flask) -> None:
    ctx = app.app_context()
    ctx.push()
    ctx.pop()
    with pytest.raises(LookupError):
        ctx.pop()


class TestOtlp:
    def test_spans_and_metrics_reach_a_receiver(
        self, receiver: Receiver, app: Flask, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Private providers from the OTEL_* environment: OTLP/HTTP protobuf, flushed at stop."""
        _otlp_env(monkeypatch, receiver.url)
        # Not the ``instrumented`` fixture: it names CTXTRACE_METRICS, which would
        # win over OTEL_METRICS_EXPORTER.
        assert ctxtrace.instrument(log_rate_window="off")
        agent = _agent.current()
        assert agent is not None
        client = app.test_client()
        for _ in range(2):
            client.get("/")
        _double_pop(app)
        # ctxtrace never touches the globals.
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"
        ctxtrace.uninstrument()

        ((resource, span),) = receiver.spans()
        resource_attributes = attributes(resource.attributes)
        assert resource_attributes["service.name"] == "shop-api"
        assert resource_attributes["service.instance.id"] == agent.worker
        assert span.name == "flask.app_context"
        assert span.status.code == span.status.STATUS_CODE_ERROR
        assert [e.name for e in span.events] == ["ctxtrace.double_pop"]
        assert attributes(span.attributes)["ctxtrace.outcome"] == "double_pop"

        (contexts,) = [
            p for p in receiver.metric("ctxtrace.contexts")
            if attributes(p.attributes)["kind"] == "app"
        ]
        assert contexts.as_int == 3
        labels = {"kind": "app", "app": "shop", "worker": agent.worker}
        assert attributes(contexts.attributes) == labels
        histograms = {
            attributes(p.attributes)["kind"]: p
            for p in receiver.metric("ctxtrace.context.duration")
        }
        assert histograms["app"].count == 3 and histograms["request"].count == 2
        assert list(histograms["app"].explicit_bounds) == list(_metrics.BUCKETS)
        anomalies = {
            (attributes(p.attributes)["anomaly"], attributes(p.attributes)["kind"]): p.as_int
            for p in receiver.metric("ctxtrace.anomalies")
        }
        assert anomalies[("double_pop", "app")] == 1
        assert sum(anomalies.values()) == 1

    def test_a_renamed_process_exports_under_its_new_name(
        self, receiver: Receiver, app: Flask, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A process whose role becomes known after start (gunicorn's master loading its
        arbiter, a Celery worker): spans and points carry the new name, in the Resource as
        in the worker label, and nothing goes out under the name it started with."""
        _otlp_env(monkeypatch, receiver.url)
        assert ctxtrace.instrument(log_rate_window="off")
        agent = _agent.current()
        assert agent is not None
        first = agent.worker
        agent.set_role("renamed-role")
        assert agent.worker != first and agent.worker.endswith(":renamed-role")
        _double_pop(app)
        ctxtrace.uninstrument()

        ((resource, span),) = receiver.spans()
        assert attributes(resource.attributes)["service.instance.id"] == agent.worker
        assert [e.name for e in span.events] == ["ctxtrace.double_pop"]
        points = receiver.metric("ctxtrace.contexts")
        assert points
        assert {attributes(p.attributes)["worker"] for p in points} == {agent.worker}
        names = {
            attributes(rm.resource.attributes)["service.instance.id"]
            for request in receiver.metrics
            for rm in request.resource_metrics
        }
        assert names == {agent.worker}

    def test_failures_are_counted_never_raised(
        self, app: Flask, monkeypatch: pytest.MonkeyPatch,
        clean_otel_env: None, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A receiver that refuses everything: the app is untouched, each exporter counts."""
        refusing = Receiver(status=400)
        try:
            _otlp_env(monkeypatch, refusing.url)
            assert ctxtrace.instrument(log_rate_window="off")
            agent = _agent.current()
            assert agent is not None
            _double_pop(app)
            ctxtrace.uninstrument()
        finally:
            refusing.close()
        counts = agent.errors.counts()
        assert counts["exporter.traces.otlp"] >= 1
        assert counts["exporter.metrics.otlp"] >= 1
        logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        components = [e["component"] for e in logged if e["event"] == "ctxtrace.internal_error"]
        assert sorted(components) == ["exporter.metrics.otlp", "exporter.traces.otlp"]


class TestPrometheusEndpoint:
    def test_first_free_port_target_file_and_names(
        self, instrumented: Any, app: Flask, tmp_path: Path, clean_otel_env: None
    ) -> None:
        """Per worker: the first free port of the range, a file_sd entry, Prometheus names."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            first = taken.getsockname()[1]
            instrumented(
                metrics="prometheus",
                prometheus_port=f"{first}-{first + 20}",
                prometheus_targets_dir=str(tmp_path),
            )
            agent = _agent.current()
            assert agent is not None
            emitter = next(e for e in agent.emitters if isinstance(e, _metrics.MetricsEmitter))
            assert emitter.private is not None and emitter.private.endpoint is not None
            endpoint = emitter.private.endpoint
            assert first < endpoint.port <= first + 20
        client = app.test_client()
        for _ in range(2):
            client.get("/")
        _double_pop(app)
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018 - the failed access is the point
        agent.ledger.settle_now()  # outside any unit: told at the sweep, or now

        target = tmp_path / _prometheus.target_file_name(agent.worker)
        assert json.loads(target.read_text()) == [
            {"targets": [f"127.0.0.1:{endpoint.port}"], "labels": {"worker": agent.worker}}
        ]
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        names = {name for name, _ in samples}
        for name in (
            "ctxtrace_context_duration_seconds_bucket",
            "ctxtrace_context_duration_seconds_sum",
            "ctxtrace_context_duration_seconds_count",
            "ctxtrace_contexts_active",
            "ctxtrace_context_depth_max",
            "ctxtrace_contexts_total",
            "ctxtrace_anomalies_total",
            "ctxtrace_out_of_context_access_total",
            "ctxtrace_dropped_total",
            "ctxtrace_internal_errors_total",
            # The standard process metrics, beside the agent's (the rules need the start).
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ):
            assert name in names, name

        def sample(name: str, **labels: str) -> float:
            key = (name, tuple(sorted({**labels, "worker": agent.worker}.items())))
            return samples[key]

        assert sample("ctxtrace_contexts_total", kind="request", app="shop") == 2
        assert sample("ctxtrace_contexts_total", kind="app", app="shop") == 3
        assert sample("ctxtrace_context_duration_seconds_count", kind="app", app="shop") == 3
        assert sample(
            "ctxtrace_context_duration_seconds_bucket", kind="app", app="shop", le="+Inf"
        ) == 3
        assert sample(
            "ctxtrace_anomalies_total", anomaly="double_pop", kind="app", app="shop"
        ) == 1
        assert sample(
            "ctxtrace_out_of_context_access_total", proxy="current_app", phase="runtime",
            outcome="handled",
        ) == 1
        assert sample("ctxtrace_dropped_total", what="context") == 0
        assert sample("ctxtrace_internal_errors_total", component="hooks") == 0
        # Its own worker label, as file_sd gives it: the rules join on it.
        started = sample("process_start_time_seconds")
        assert time.time() - 3600 < started <= time.time()

        ctxtrace.uninstrument()
        assert not target.exists()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", endpoint.port), 1):
            pass

    def test_the_target_file_appears_once_the_series_are_served(
        self, instrumented: Any, tmp_path: Path, clean_otel_env: None,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Whoever finds the file finds ctxtrace's series: it is written after the instruments.

        The spy scrapes the endpoint as the file is written, the first moment file_sd
        could hand it to a scraper; written earlier, that scrape got only the process
        metrics (seen from a fresh gunicorn worker under load).
        """
        served_at_announce: list[set[str]] = []
        write = _prometheus.Endpoint.write_target_file

        def scraped_then_written(endpoint: Any, folder: Path, worker: str) -> Path:
            served_at_announce.append(set(_scrape_names(endpoint.port)))
            return write(endpoint, folder, worker)

        monkeypatch.setattr(_prometheus.Endpoint, "write_target_file", scraped_then_written)
        instrumented(
            metrics="prometheus", prometheus_port="0", prometheus_targets_dir=str(tmp_path)
        )
        (names,) = served_at_announce
        for name in (
            "ctxtrace_out_of_context_access_total", "ctxtrace_context_depth_max",
            "ctxtrace_internal_errors_total", "ctxtrace_dropped_total",
        ):
            assert name in names, name

    def test_stale_target_files_are_removed(
        self, instrumented: Any, tmp_path: Path, clean_otel_env: None
    ) -> None:
        """Files of dead workers on this host go; live ones and other hosts' stay."""
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True, text=True, check=True, timeout=30,
        )
        dead_pid = int(dead.stdout)
        host = socket.gethostname().split(".", 1)[0][:40]

        def target(worker: str) -> Path:
            path = tmp_path / _prometheus.target_file_name(worker)
            path.write_text(json.dumps(
                [{"targets": ["127.0.0.1:1"], "labels": {"worker": worker}}]
            ))
            return path

        stale = target(f"{host}:{dead_pid}:gunicorn")
        alive = target(f"{host}:{os.getppid()}:gunicorn")
        elsewhere = target(f"other-host:{dead_pid}:gunicorn")
        unrelated = tmp_path / "hand-written.json"
        unrelated.write_text('[{"targets": ["10.0.0.1:9100"]}]')
        instrumented(
            metrics="prometheus", prometheus_port="0", prometheus_targets_dir=str(tmp_path)
        )
        assert not stale.exists()
        assert alive.exists() and elsewhere.exists() and unrelated.exists()

    def test_no_free_port_is_counted(
        self, instrumented: Any, app: Flask, clean_otel_env: None
    ) -> None:
        """A range with no free port: ctxtrace runs on, the failure is counted."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            instrumented(metrics="prometheus", prometheus_port=str(port))
        agent = _agent.current()
        assert agent is not None
        assert agent.errors.counts() == {"exporter.metrics.prometheus": 1}
        with app.app_context():
            pass


def test_embedded_default_exports_no_spans(app: Flask, clean_otel_env: None) -> None:
    """Nothing configured: metrics on the local endpoint, no span leaves the process.

    (Only the port is set, to 0, so that the test cannot collide with anything.)
    """
    assert ctxtrace.instrument(prometheus_port="0")
    agent = _agent.current()
    assert agent is not None
    spans = next(e for e in agent.emitters if isinstance(e, _spans.SpanEmitter))
    emitter = next(e for e in agent.emitters if isinstance(e, _metrics.MetricsEmitter))
    assert spans.private is None and spans._tracer is None
    assert emitter.private is not None and emitter.private.endpoint is not None
    assert emitter.private.push_readers == []
    _double_pop(app)
    assert agent.errors.counts() == {}


def test_global_providers_are_used_and_kept() -> None:
    """Providers the application set globally get ctxtrace's telemetry and stay in place;
    no private provider and no endpoint of ctxtrace's own."""
    script = """
import json
from flask import Flask
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import ctxtrace
from ctxtrace import _agent

spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
meter_provider = MeterProvider(metric_readers=[reader])
trace.set_tracer_provider(tracer_provider)
metrics.set_meter_provider(meter_provider)
ctxtrace.instrument()
emitters = {e.name: e for e in _agent.current().emitters}
app = Flask("shop")
ctx = app.app_context(); ctx.push(); ctx.pop()
try:
    ctx.pop()
except LookupError:
    pass
names = [m.name for rm in reader.get_metrics_data().resource_metrics
         for sm in rm.scope_metrics for m in sm.metrics]
print(json.dumps({
    "same_tracer_provider": trace.get_tracer_provider() is tracer_provider,
    "same_meter_provider": metrics.get_meter_provider() is meter_provider,
    "private": [emitters["metrics"].private is not None, emitters["spans"].private is not None],
    "spans": [s.name for s in spans.get_finished_spans()],
    "metrics": sorted(set(names)),
}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env["OTEL_TRACES_EXPORTER"] = "console"  # would make a private provider, were there none
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same_tracer_provider"] and result["same_meter_provider"]
    assert result["private"] == [False, False]
    assert result["spans"] == ["flask.app_context"]
    assert "ctxtrace.contexts" in result["metrics"]
    assert "ctxtrace.context.duration" in result["metrics"]


def test_a_resource_at_interpreter_exit_reuses_the_last_detection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No thread pool for the SDK's detectors at exit: the last detected resource, with this
    worker's instance id (a forked worker retired before its first tick writes its counts)."""
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - SDK-only test

    from ctxtrace.telemetry import sdk_providers  # noqa: PLC0415 - loads the SDK

    first = sdk_providers.resource("h:1:gunicorn-master")

    def refused(*args: Any, **kwargs: Any) -> Resource:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(Resource, "create", refused)
    late = sdk_providers.resource("h:2:gunicorn")
    assert late.attributes == {**first.attributes, "service.instance.id": "h:2:gunicorn"}
