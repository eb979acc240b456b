"""No request data in telemetry: markers in every part of a request, every anomaly, no marker out.

The requests carry recognisable markers in the query string, path, headers,
cookies, form fields, JSON body, session and ``g``, and the views read and
echo them. Between them they make every anomaly ctxtrace knows. None of the
markers may appear in an event, a log line, a span (``CTXTRACE_SPANS=all``, so
every context becomes one) or a metric.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app, g, request, session
from flask import globals as flask_globals
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ctxtrace import ANOMALIES, _agent

from ._support import clear_flask_stacks

MARKERS = {
    "query": "QRYMARK7f3a",
    "path": "PATHMARK91bd",
    "header": "HDRMARKc0de",
    "cookie": "COOKIEMARK5eed",
    "form": "FORMMARKbeef",
    "json": "JSONMARKa11c",
    "session": "SESSMARKd00d",
    "g": "GMARKf00d",
    "password": "hunter2-PWMARK0b5e",
}


def _read_everything() -> str:
    """What a view does with request data: read all of it, keep some in session and g."""
    session["secret"] = MARKERS["session"]
    session["password"] = MARKERS["password"]
    g.secret = MARKERS["g"]
    seen = [
        request.args.get("q", ""),
        request.headers.get("X-Secret", ""),
        request.cookies.get("secret", ""),
        request.form.get("secret", ""),
        str((request.get_json(silent=True) or {}).get("secret", "")),
        request.path,
    ]
    return "|".join(seen)


def _app() -> Flask:
    app = Flask("secure")
    app.config["SECRET_KEY"] = "not-a-marker"

    @app.route("/plain/<token>", methods=["GET", "POST"])
    def plain(token: str) -> str:
        return _read_everything() + token

    @app.route("/leak/<token>", methods=["GET", "POST"])
    def leak(token: str) -> str:
        return _read_everything()

    @app.route("/wrong/<token>", methods=["GET", "POST"])
    def wrong(token: str) -> str:
        text = _read_everything()
        base = flask_globals._cv_app.get(None)
        outer, inner = app.app_context(), app.app_context()
        outer.push()
        g.secret = MARKERS["g"]
        inner.push()
        g.secret = MARKERS["g"]
        try:
            outer.pop()
        except (AssertionError, RuntimeError):
            while flask_globals._cv_app.get(None) not in (None, base):
                flask_globals._cv_app.get().pop()
        return text

    @app.route("/double/<token>", methods=["GET", "POST"])
    def double(token: str) -> str:
        text = _read_everything()
        ctx = app.app_context()
        ctx.push()
        g.secret = MARKERS["g"]
        ctx.pop()
        with contextlib.suppress(IndexError, RuntimeError):
            ctx.pop()
        return text

    _thread_routes(app)
    inner_wsgi = app.wsgi_app

    def leaky_middleware(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"].startswith("/leak/"):
            app.app_context().push()
        return inner_wsgi(environ, start_response)

    app.wsgi_app = leaky_middleware  # type: ignore[method-assign]
    return app


def _thread_routes(app: Flask) -> None:
    """The views that hand work to a thread: a foreign pop, out-of-context reads."""

    @app.route("/foreign/<token>", methods=["GET", "POST"])
    def foreign(token: str) -> str:
        text = _read_everything()
        box: list[Any] = []
        pushed, popped = threading.Event(), threading.Event()

        def pusher() -> None:
            ctx = app.app_context()
            ctx.push()
            g.secret = MARKERS["g"]
            box.append(ctx)
            pushed.set()
            popped.wait(10)

        thread = threading.Thread(target=pusher, name="pusher")
        thread.start()
        pushed.wait(10)
        with contextlib.suppress(ValueError, RuntimeError):
            box[0].pop()
        popped.set()
        thread.join(10)
        return text

    @app.route("/outside/<token>", methods=["GET", "POST"])
    def outside(token: str) -> str:
        text = _read_everything()

        def reader() -> None:
            for read in (
                lambda: request.form["secret"],
                lambda: session["secret"],
                lambda: g.secret,
                lambda: current_app.config["SECRET_KEY"],
            ):
                with contextlib.suppress(RuntimeError):
                    read()

        thread = threading.Thread(target=reader, name="reader")
        thread.start()
        thread.join(10)
        return text


def _send(client: Any, kind: str) -> None:
    """One request to ``/kind/...`` with a marker in every part of it."""
    client.set_cookie("secret", MARKERS["cookie"])
    url = f"/{kind}/{MARKERS['path']}?q={MARKERS['query']}"
    headers = {"X-Secret": MARKERS["header"], "Authorization": f"Bearer {MARKERS['password']}"}
    form = client.post(url, headers=headers, data={"secret": MARKERS["form"]})
    assert form.status_code == 200
    assert MARKERS["form"] in form.get_data(as_text=True)
    as_json = client.post(url, headers=headers, json={"secret": MARKERS["json"]})
    assert as_json.status_code == 200
    assert MARKERS["json"] in as_json.get_data(as_text=True)


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[InMemorySpanExporter, Any]]:
    """The application's own tracer and meter providers, in memory, handed to ctxtrace.

    Requested before ``instrumented``, so the agent stops before they shut down.
    """
    from ctxtrace.telemetry import providers  # noqa: PLC0415 - the telemetry layer's hand-over point

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setitem(providers._explicit, "tracer", tracer_provider)
    monkeypatch.setitem(providers._explicit, "meter", meter_provider)
    yield exporter, reader
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _run_every_anomaly(app: Flask) -> None:
    """Requests that make every anomaly, each carrying every marker."""
    agent = _agent.current()
    assert agent is not None
    for kind in ("plain", "wrong", "double", "foreign", "outside"):
        _send(app.test_client(), kind)
    # A leak on a thread that serves the next request: leaked, then stale_context.
    done = threading.Event()

    def same_thread() -> None:
        client = app.test_client()
        _send(client, "leak")
        _send(client, "plain")
        clear_flask_stacks()
        done.set()

    worker = threading.Thread(target=same_thread, name="served-twice")
    worker.start()
    worker.join(10)
    assert done.is_set()
    # A request context kept past the (tiny) long_lived limit, found by the watchdog.
    with app.test_request_context(
        f"/plain/{MARKERS['path']}?q={MARKERS['query']}",
        method="POST",
        headers={"X-Secret": MARKERS["header"], "Cookie": f"secret={MARKERS['cookie']}"},
        data={"secret": MARKERS["form"]},
    ):
        _read_everything()
        time.sleep(0.05)
        agent.sweep()


def _metrics_text(reader: InMemoryMetricReader) -> str:
    data = reader.get_metrics_data()
    return data.to_json() if data is not None else ""


def _captured(
    instrumented: Any,
    telemetry: tuple[InMemorySpanExporter, InMemoryMetricReader],
    capsys: pytest.CaptureFixture[str],
) -> tuple[list[Any], dict[str, list[str]]]:
    """Run every anomaly with everything on; the events, and each channel as text."""
    exporter, reader = telemetry
    recorder = instrumented(
        spans="all", long_lived_request=0.01, long_lived_app=0.01, log_lifecycle=True
    )
    agent = _agent.current()
    assert agent is not None
    _run_every_anomaly(_app())
    agent.flush(5.0)
    # Positive control: the run made every anomaly, and every channel carried something.
    assert set(recorder.names()) == set(ANOMALIES)
    assert recorder.accesses()
    assert agent.errors.counts() == {}
    channels = {
        "logs": capsys.readouterr().err.splitlines(),
        "spans": [span.to_json() for span in exporter.get_finished_spans()],
        "metrics": [_metrics_text(reader)],
    }
    assert len(channels["spans"]) > 10 and "ctxtrace" in channels["metrics"][0]
    assert len(channels["logs"]) > 10
    return list(recorder.events), channels


def _assert_no_marker(channels: dict[str, list[str]]) -> None:
    for channel, texts in channels.items():
        for name, marker in MARKERS.items():
            leaking = [t for t in texts if marker in t]
            assert leaking == [], f"the {name} marker is in {channel}: {leaking[0][:500]}"


def test_no_marker_in_events_logs_spans_or_metrics(
    telemetry: tuple[InMemorySpanExporter, InMemoryMetricReader],
    instrumented: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every anomaly, every part of the request marked: no marker in any telemetry."""
    events, channels = _captured(instrumented, telemetry, capsys)
    # What a subscriber that logs events whole would write (``carry``, the telemetry
    # layer's handle on the request's trace, is kept out of repr).
    channels["events"] = [repr(event) for event in events]
    _assert_no_marker(channels)
