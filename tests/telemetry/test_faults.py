"""Faults outside ctxtrace's code: a collector down, hanging, slow or refusing, a Prometheus
port range taken, a full disk and a stalled pipe under the log stream, a tracer that raises.

Each one: the application sees exactly what a bare run sees, no request waits for the
fault, ``ctxtrace_internal_errors_total`` counts it under a component that names it, and
it is logged once, not once per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from flask import Flask, current_app
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import ctxtrace
from ctxtrace import _agent
from ctxtrace.telemetry import providers

from .._otlp import Receiver
from .._servers import REPO, free_port, wait_until
from .._support import outcomes_app

#: What a request may take at most, whatever the exporters do: well under every hang below.
REQUEST_BOUND_S = 1.0
#: The receiver's hang; the OTLP exporters give up after ``OTLP_TIMEOUT_S``.
HANG_S = 5.0
OTLP_TIMEOUT_S = 1.5
#: ``uninstrument()`` stops within its 5 s budget; this is that plus slack for a busy machine.
STOP_BOUND_S = 7.0
ROUNDS = 12


def drive(app: Flask, rounds: int = ROUNDS) -> tuple[list[Any], float]:
    """Requests and anomalies (a double pop, a leak in a thread, an access outside any
    context): what the application saw, and the longest any one of them took."""
    client = app.test_client()
    seen: list[Any] = []
    worst = 0.0

    def leak() -> None:
        app.app_context().push()  # the thread ends with it pushed: leaked

    for _ in range(rounds):
        started = time.monotonic()
        for path in ("/ok", "/missing"):
            response = client.get(path)
            seen.append((path, response.status_code, response.get_data()))
        try:
            client.get("/crash")
        except ValueError as exc:
            seen.append(("crash", type(exc), str(exc)))
        ctx = app.app_context()
        ctx.push()
        ctx.pop()
        try:
            ctx.pop()
        except Exception as exc:  # whatever Flask raises, in both runs
            seen.append(("double", type(exc)))
        thread = threading.Thread(target=leak)
        thread.start()
        thread.join(10)
        try:
            current_app.name  # noqa: B018 - the failed access is the point
        except RuntimeError as exc:
            seen.append(("outside", str(exc)))
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.02)
    agent = _agent.current()
    if agent is not None:
        agent.ledger.settle_now()  # the accesses outside any unit are told at once
    return seen, worst


def internal_error_lines(text: str) -> Counter[str]:
    """How many ``ctxtrace.internal_error`` lines each component got."""
    found: Counter[str] = Counter()
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "ctxtrace.internal_error":
                found[record["component"]] += 1
    return found


def running() -> _agent.Agent:
    agent = _agent.current()
    assert agent is not None
    return agent


# -- OTLP -------------------------------------------------------------------------


@pytest.fixture
def collector(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """``(behaviour, url)``; ``down``: a free port nothing listens on."""
    behaviour = request.param
    if behaviour == "down":
        yield behaviour, f"http://127.0.0.1:{free_port()}"
        return
    delay = {"hang": HANG_S, "slow": 0.3}.get(behaviour, 0.0)
    server = Receiver(status=500 if behaviour == "500" else 200, delay=delay)
    try:
        yield behaviour, server.url
    finally:
        server.close()


@pytest.mark.parametrize("collector", ["down", "hang", "slow", "500"], indirect=True)
def test_otlp_collector_faults(
    collector: tuple[str, str], instrumented: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """Spans of every context and metrics over OTLP to a collector that is down, hangs,
    is slow or answers 500: the same responses and exceptions as a bare run, no request
    waits for the exporter, failures counted per exporter and logged once, and
    uninstrument() keeps its budget."""
    behaviour, url = collector
    bare, _ = drive(outcomes_app())
    for name, value in {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_EXPORTER_OTLP_TIMEOUT": str(OTLP_TIMEOUT_S),
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    instrumented(spans="all", metrics="otlp")
    agent = running()
    seen, worst = drive(outcomes_app())
    assert seen == bare
    assert worst < REQUEST_BOUND_S, f"a round of requests took {worst:.2f} s"

    exporters = {"exporter.traces.otlp", "exporter.metrics.otlp"}
    if behaviour == "slow":
        time.sleep(0.5)
    else:
        wait_until(
            lambda: exporters <= set(agent.errors.counts()),
            timeout=OTLP_TIMEOUT_S * 4, what="both exporters' failures to be counted",
        )
    started = time.monotonic()
    ctxtrace.uninstrument()
    assert time.monotonic() - started < STOP_BOUND_S

    counts = agent.errors.counts()
    if behaviour == "slow":
        assert not exporters & set(counts), counts
    lines = internal_error_lines(capsys.readouterr().err)
    assert set(lines) == set(counts), (lines, counts)
    assert set(lines.values()) <= {1}, "each component is logged once, then only counted"
    # The SDK's own line per failed export or retry is folded into that one line.
    sdk = [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    assert sdk == [], [r.getMessage() for r in sdk]


# -- Prometheus ---------------------------------------------------------------------


@contextlib.contextmanager
def taken_ports(count: int) -> Iterator[tuple[int, int]]:
    """``count`` consecutive loopback ports, each held by a listening socket."""
    for _attempt in range(20):
        first = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
                sock.listen()
        except OSError:
            for sock in held:
                sock.close()
            continue
        try:
            yield first, first + count - 1
        finally:
            for sock in held:
                sock.close()
        return
    pytest.fail("no run of free loopback ports to occupy", pytrace=False)


def test_prometheus_port_range_taken(
    instrumented: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every port of the configured range taken: the app runs as bare, the endpoint's
    failure is counted once (not per request) and logged once, naming the range."""
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    bare, _ = drive(outcomes_app())
    with taken_ports(3) as (low, high):
        instrumented(metrics="prometheus", prometheus_port=f"{low}-{high}")
        agent = running()
        seen, worst = drive(outcomes_app())
    assert seen == bare
    assert worst < REQUEST_BOUND_S
    assert agent.errors.counts() == {"exporter.metrics.prometheus": 1}
    ctxtrace.uninstrument()
    err = capsys.readouterr().err
    assert internal_error_lines(err) == {"exporter.metrics.prometheus": 1}
    assert f"no free port in {low}-{high}" in err


# -- the log stream -----------------------------------------------------------------


def test_log_stream_on_a_full_disk(
    instrumented: Any, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """ctxtrace has no log file of its own: its lines go to stderr. Here stderr is
    ``/dev/full`` (every write fails with ENOSPC, as on a full disk): requests are as
    bare, each lost line is counted under ``logs``, and the one line about it reaches the
    process's original stderr."""
    bare, _ = drive(outcomes_app())
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stderr", full)
        instrumented()
        agent = running()
        seen, worst = drive(outcomes_app())
        counts = agent.errors.counts()
        ctxtrace.uninstrument()
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            full.close()  # its buffer still holds lines it could not write
    assert seen == bare
    assert worst < REQUEST_BOUND_S
    # Three anomalies a round (double pop, leak, access), every line lost.
    assert counts == {"logs": 3 * ROUNDS}
    assert internal_error_lines(capfd.readouterr().err) == {"logs": 1}


@pytest.fixture
def structlog_to_full_disk() -> Iterator[None]:
    """The application's structlog writing JSON lines to a file on a full disk."""
    with open("/dev/full", "w") as full:
        structlog.configure(
            processors=[structlog.processors.JSONRenderer()],
            logger_factory=structlog.WriteLoggerFactory(file=full),
        )
        try:
            yield
        finally:
            structlog.reset_defaults()
            with contextlib.suppress(OSError):
                full.close()


@pytest.mark.usefixtures("structlog_to_full_disk")
def test_application_log_file_on_a_full_disk(
    instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The application's structlog writes to a file on a full disk (``/dev/full``): ctxtrace's
    lines go through it and fail; requests are as bare, the failures are counted, and the
    one line about them goes to stderr instead."""
    bare, _ = drive(outcomes_app())
    instrumented()
    agent = running()
    seen, _ = drive(outcomes_app())
    counts = agent.errors.counts()
    ctxtrace.uninstrument()
    assert seen == bare
    assert counts == {"logs": 3 * ROUNDS}
    assert internal_error_lines(capsys.readouterr().err) == {"logs": 1}


_STALLED_PIPE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import ctxtrace
from ctxtrace import _agent
from tests._support import outcomes_app
from tests.telemetry.test_faults import drive
ctxtrace.instrument(metrics="none", log_rate_window="off")
started = time.monotonic()
seen, worst = drive(outcomes_app(), rounds=int(sys.argv[2]))
print(json.dumps({"worst": worst, "total": time.monotonic() - started,
                  "errors": _agent.current().errors.counts()}), flush=True)
"""


def test_log_stream_a_pipe_nobody_reads() -> None:
    """stderr a pipe whose reader stopped reading, already full (a stuck log shipper): a
    write to it would wait forever, on the request thread. Requests finish in time, each
    line that found no room is counted under ``logs``, and no half line reaches the pipe.
    (The line about it has nowhere to go: the counter carries it.)"""
    rounds = 4
    read_end, write_end = os.pipe()
    try:
        flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
        fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        filler = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler += os.write(write_end, b"#" * 4096)
        fcntl.fcntl(write_end, fcntl.F_SETFL, flags)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with subprocess.Popen(
            [sys.executable, "-c", _STALLED_PIPE, str(REPO), str(rounds)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=write_end, text=True,
        ) as child:
            try:
                out, _ = child.communicate(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
        os.close(write_end)
        write_end = -1
        assert child.returncode == 0, out
        result = json.loads(out.strip().splitlines()[-1])
        assert result["worst"] < REQUEST_BOUND_S, result
        assert result["errors"] == {"logs": 3 * rounds}
        drained = b""
        for _ in range(1000):
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            drained += chunk
        assert drained == b"#" * filler, "nothing was written over the full pipe"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


# -- a tracer that raises -------------------------------------------------------------


class FailingProcessor(SpanProcessor):
    """The application's span processor that raises on every span it is handed."""

    def on_end(self, span: Any) -> None:
        raise OSError("span sink unavailable")


@pytest.fixture
def failing_tracer_and_reader() -> Iterator[InMemoryMetricReader]:
    """The application's TracerProvider (with the failing processor) and MeterProvider
    (with an in-memory reader), handed to ctxtrace as an instrumentor would."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(FailingProcessor())
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    providers.set_explicit(tracer_provider, meter_provider)
    try:
        yield reader
    finally:
        providers.set_explicit(None, None)
        meter_provider.shutdown()
        tracer_provider.shutdown()


def test_span_emitter_that_raises(
    failing_tracer_and_reader: InMemoryMetricReader, instrumented: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The application's span pipeline raises on every span (a real SpanProcessor, the
    application's code, not ctxtrace's): requests are as bare, every failure is in
    ``ctxtrace_internal_errors_total{component="spans"}``, and it is logged once."""
    bare, _ = drive(outcomes_app())
    instrumented(spans="all")
    agent = running()
    seen, _ = drive(outcomes_app())
    assert seen == bare
    counts = agent.errors.counts()
    assert set(counts) == {"spans"} and counts["spans"] >= 4 * ROUNDS
    data: Any = failing_tracer_and_reader.get_metrics_data()
    exported = {
        point.attributes["component"]: point.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "ctxtrace.internal_errors"
        for point in metric.data.data_points
    }
    # The core components are exported at 0 from the start; only spans failed.
    assert {component: n for component, n in exported.items() if n} == counts
    ctxtrace.uninstrument()
    assert internal_error_lines(capsys.readouterr().err) == {"spans": 1}
