"""Spans: made only for anomalies by default, back-dated, nested under the request's span."""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

from ctxtrace import _agent
from ctxtrace.core.flaskshape import detect
from ctxtrace.telemetry import providers

from .._support import clear_flask_stacks, line_of

MERGED = detect().merged


@pytest.fixture
def provider(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """The application's TracerProvider, handed to ctxtrace as the instrumentor would."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setitem(providers._explicit, "tracer", tracer_provider)
    yield tracer_provider, exporter
    tracer_provider.shutdown()


@pytest.fixture
def exporter(provider: tuple[TracerProvider, InMemorySpanExporter]) -> InMemorySpanExporter:
    return provider[1]


@pytest.fixture
def traced_app(provider: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[Flask]:
    """An app under OpenTelemetry's own Flask instrumentation, with a few faulty views."""
    app = Flask("shop")

    @app.route("/")
    def index() -> str:
        return "ok"

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return str(item_id)

    @app.route("/wrong-pop")
    def wrong_pop() -> str:
        outer = app.app_context()
        outer.push()  # site: pushed-in-view
        time.sleep(0.02)
        inner = app.app_context()
        inner.push()
        # Flask restores the stack to what it was before ``outer``, then raises.
        with contextlib.suppress(AssertionError):
            outer.pop()
        return "recovered"

    @app.route("/leaves-app-context/<int:item_id>")
    def leaves_app_context(item_id: int) -> str:
        app.app_context().push()
        return "left one pushed"

    @app.route("/leaves-request-context/<int:item_id>")
    def leaves_request_context(item_id: int) -> str:
        app.test_request_context("/").push()
        return "left one pushed"

    FlaskInstrumentor().instrument_app(app, tracer_provider=provider[0])
    # A leaked request context skips the instrumentation's teardown, so its span
    # stays attached; its activation, once garbage, detaches whenever the collector
    # gets to it, wiping the OpenTelemetry context of whatever runs then (a later
    # test). Pop the leftovers (the teardown detaches) and collect, then put the
    # context back as it was.
    token = otel_context.attach(otel_context.Context())
    yield app
    clear_flask_stacks()
    gc.collect()
    otel_context.detach(token)
    FlaskInstrumentor().uninstrument_app(app)


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _server(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    servers = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in spans]
    return servers[0]


def _child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        span.parent is not None
        and span.parent.span_id == parent.context.span_id
        and span.context.trace_id == parent.context.trace_id
    )


def _epoch(monotonic_ns: int) -> int:
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


class TestDefaultMode:
    def test_healthy_contexts_make_no_spans(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """With spans=anomalies, healthy requests and contexts leave only the server spans."""
        instrumented(metrics="none")
        client = traced_app.test_client()
        for _ in range(3):
            assert client.get("/").status_code == 200
        with traced_app.app_context():
            pass
        names = [s.name for s in exporter.get_finished_spans()]
        assert names == ["GET /"] * 3

    def test_anomaly_span_is_back_dated_and_nested(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """A wrong pop in a view: a span from the push, under the Flask server span, ERROR."""
        recorder = instrumented(metrics="none")
        assert traced_app.test_client().get("/wrong-pop").get_data() == b"recovered"
        spans = exporter.get_finished_spans()
        server = _server(spans)
        (span,) = _named(spans, "flask.app_context")
        (anomaly,) = recorder.anomalies("wrong_pop")
        assert _child_of(span, server)
        assert span.kind == trace.SpanKind.INTERNAL
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == "wrong_pop"
        assert span.start_time is not None and span.end_time is not None
        # Back-dated to the push, converted from the monotonic clock.
        assert abs(span.start_time - _epoch(anomaly.context.pushed_ns)) < 2_000_000
        assert server.start_time is not None and span.start_time >= server.start_time
        (event,) = span.events
        assert event.name == "ctxtrace.wrong_pop"
        assert event.timestamp - span.start_time >= 20_000_000
        attributes = dict(span.attributes or {})
        agent = _agent.current()
        assert agent is not None
        assert attributes == {
            "flask.app.name": "shop",
            "flask.context.kind": "app",
            "ctxtrace.context.id": anomaly.context.id,
            "ctxtrace.context.depth": 2,
            "ctxtrace.worker.id": agent.worker,
            "ctxtrace.outcome": "wrong_pop",
            "thread.id": threading.get_ident(),
            "thread.name": threading.current_thread().name,
            "code.function.name": anomaly.context.site.function if anomaly.context.site else "",
            "code.file.path": __file__,
            "code.line.number": line_of(__file__, "pushed-in-view"),
        }
        assert "wrong_pop" in str(attributes["code.function.name"])
        assert dict(event.attributes or {})["ctxtrace.top.kind"] == "app"

    def test_app_context_flask_pushed_for_the_request_nests_too(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """A context left pushed in a view makes Flask pop its own app context wrongly; that
        context was pushed before the server span existed, and still nests under it."""
        instrumented(metrics="none")
        with pytest.raises(AssertionError, match="Popped wrong app context"):
            traced_app.test_client().get("/leaves-app-context/7")
        spans = exporter.get_finished_spans()
        server = _server(spans)
        (span,) = _named(spans, "flask.app_context")
        assert _child_of(span, server)
        attributes = dict(span.attributes or {})
        assert attributes["ctxtrace.outcome"] == "wrong_pop"
        assert attributes["flask.endpoint"] == "leaves_app_context"
        assert "code.file.path" not in attributes  # pushed by Flask, not by a line of ours

    def test_request_context_span_has_route(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """A request context's span carries http.route and the request's trace.

        The leaked request context also confuses OpenTelemetry's instrumentation,
        which then never ends its server span; the log line names it.
        """
        instrumented(metrics="none")
        with pytest.raises(AssertionError, match="Popped wrong request context"):
            traced_app.test_client().get("/leaves-request-context/3")
        (span,) = _named(exporter.get_finished_spans(), "flask.request_context")
        assert span.parent is not None and span.parent.is_valid and not span.parent.is_remote
        attributes = dict(span.attributes or {})
        assert attributes["http.route"] == "/leaves-request-context/<int:item_id>"
        assert attributes["flask.context.kind"] == "request"
        assert [e.name for e in span.events] == ["ctxtrace.wrong_pop"]

    def test_leak_span_ends_when_the_leak_is_found(
        self, instrumented: Any, app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """A context a thread left pushed: a span from its push to when the leak was found."""
        recorder = instrumented(metrics="none")

        def leak() -> None:
            app.app_context().push()
            time.sleep(0.01)

        thread = threading.Thread(target=leak, name="leaker")
        thread.start()
        thread.join(5)
        agent = _agent.current()
        assert agent is not None
        agent.sweep()
        (anomaly,) = recorder.anomalies("leaked")
        (span,) = exporter.get_finished_spans()
        assert span.name == "flask.app_context"
        assert span.parent is None
        assert span.start_time is not None and span.end_time is not None
        assert abs(span.start_time - _epoch(anomaly.context.pushed_ns)) < 2_000_000
        (event,) = span.events
        assert event.name == "ctxtrace.leaked"
        assert abs(event.timestamp - _epoch(anomaly.at_ns)) < 2_000_000
        assert span.end_time >= event.timestamp >= span.start_time + 10_000_000
        assert dict(event.attributes or {})["ctxtrace.reason"] == anomaly.reason
        assert dict(span.attributes or {})["thread.name"] == "leaker"

    def test_spans_off_makes_none(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """With spans=off there is no span emitter and anomalies make no spans."""
        instrumented(metrics="none", spans="off")
        agent = _agent.current()
        assert agent is not None
        assert "spans" not in [e.name for e in agent.emitters]
        traced_app.test_client().get("/wrong-pop")
        assert [s.name for s in exporter.get_finished_spans()] == ["GET /wrong-pop"]


class TestAllMode:
    def test_a_request_is_one_span_under_the_server_span(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """spans=all: one span for the request, the app context Flask <= 3.1 pushes for it
        folded in, with four attributes."""
        instrumented(metrics="none", spans="all")
        sent = time.time_ns()
        assert traced_app.test_client().get("/items/5").status_code == 200
        answered = time.time_ns()
        spans = exporter.get_finished_spans()
        server = _server(spans)
        (request_span,) = _named(spans, "flask.request_context")
        assert _named(spans, "flask.app_context") == []
        assert _child_of(request_span, server)
        assert request_span.status.status_code == StatusCode.UNSET
        assert dict(request_span.attributes or {}) == {
            "flask.app.name": "shop",
            "flask.endpoint": "item",
            "http.route": "/items/<int:item_id>",
            "ctxtrace.contexts": 1 if MERGED else 2,
        }
        assert request_span.start_time is not None and request_span.end_time is not None
        assert server.start_time is not None and server.end_time is not None
        # The request's span starts inside the server's own span and ends with the
        # request, as its pop returns: after the teardown that ended the server's span,
        # so no bound by the server's end holds on a loaded machine.
        assert sent <= server.start_time <= request_span.start_time < request_span.end_time
        assert request_span.end_time <= answered

    def test_an_explicit_pair_keeps_its_own_span(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """spans=all: a view's ``with app.app_context()`` is a span of its own beside the
        request's; the request's own contexts, which it made trackable, still fold."""

        @traced_app.route("/nested")
        def nested() -> str:
            with traced_app.app_context():  # site: nested-pair
                return "ok"

        instrumented(metrics="none", spans="all")
        assert traced_app.test_client().get("/nested").status_code == 200
        spans = exporter.get_finished_spans()
        (request_span,) = _named(spans, "flask.request_context")
        (pair,) = _named(spans, "flask.app_context")
        assert dict(request_span.attributes or {})["flask.endpoint"] == "nested"
        assert dict(pair.attributes or {}) == {
            "flask.app.name": "shop",
            "code.function.name": nested.__qualname__,
            "code.file.path": __file__,
            "code.line.number": line_of(__file__, "nested-pair"),
        }
        assert pair.status.status_code == StatusCode.UNSET
        assert _child_of(pair, _server(spans))

    def test_anomaly_becomes_an_event_on_the_context_span(
        self, instrumented: Any, traced_app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """spans=all: the wrong pop is an event and an ERROR status on that context's span."""
        instrumented(metrics="none", spans="all")
        traced_app.test_client().get("/wrong-pop")
        spans = exporter.get_finished_spans()
        erroneous = [s for s in spans if s.status.status_code == StatusCode.ERROR]
        assert [s.name for s in erroneous] == ["flask.app_context"]
        assert [e.name for e in erroneous[0].events] == ["ctxtrace.wrong_pop"]
        assert dict(erroneous[0].attributes or {})["ctxtrace.outcome"] == "wrong_pop"

    @pytest.mark.parametrize(
        ("path", "endpoint"),
        [
            ("/leaves-app-context/1", "leaves_app_context"),
            ("/leaves-request-context/2", "leaves_request_context"),
        ],
    )
    def test_an_anomaly_of_the_requests_own_context_marks_the_request_span(
        self,
        instrumented: Any,
        traced_app: Flask,
        exporter: InMemorySpanExporter,
        path: str,
        endpoint: str,
    ) -> None:
        """spans=all: Flask's pop of the request's own context, wrong because the view left
        one pushed, is an event and an ERROR status on the request's one span."""
        instrumented(metrics="none", spans="all")
        with pytest.raises(AssertionError, match="Popped wrong"):
            traced_app.test_client().get(path)
        (request_span,) = _named(exporter.get_finished_spans(), "flask.request_context")
        assert request_span.status.status_code == StatusCode.ERROR
        assert [e.name for e in request_span.events] == ["ctxtrace.wrong_pop"]
        assert dict(request_span.attributes or {})["flask.endpoint"] == endpoint

    def test_sampler_is_respected(
        self, instrumented: Any, app: Flask, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A provider that samples nothing gets no ctxtrace span either."""
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        monkeypatch.setitem(providers._explicit, "tracer", tracer_provider)
        instrumented(metrics="none", spans="all")
        app.test_client().get("/")
        with app.app_context():
            pass
        assert exporter.get_finished_spans() == ()

    def test_leaked_context_span_ends_once(
        self, instrumented: Any, app: Flask, exporter: InMemorySpanExporter
    ) -> None:
        """A leak repaired at the end of its unit is ended at the leak, not again at the pop."""
        instrumented(metrics="none", spans="all", repair=True)
        agent = _agent.current()
        assert agent is not None
        handle = agent.begin_unit("task", "cleanup")
        app.app_context().push()
        agent.end_unit(handle)
        (span,) = exporter.get_finished_spans()
        assert dict(span.attributes or {})["ctxtrace.outcome"] == "leaked"
        assert [e.name for e in span.events] == ["ctxtrace.leaked"]


@pytest.fixture
def job_tracing(
    instrumented: Any, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> tuple[trace.Tracer, InMemorySpanExporter, Any]:
    """ctxtrace on, a tracer for the application's own spans, its exporter and the agent."""
    instrumented(metrics="none")
    tracer_provider, exporter = provider
    agent = _agent.current()
    assert agent is not None
    return tracer_provider.get_tracer("job"), exporter, agent


class TestOutOfContextAccess:
    def test_event_on_the_current_span(
        self, job_tracing: tuple[trace.Tracer, InMemorySpanExporter, Any]
    ) -> None:
        """Inside a recording span, the access is an event on it with the exception fields."""
        tracer, exporter, agent = job_tracing
        with tracer.start_as_current_span("nightly-job"), pytest.raises(RuntimeError):
            handle = agent.begin_unit("task", "nightly")
            try:
                current_app.name  # noqa: B018 - the failed access is the point
            except RuntimeError as exc:
                agent.escaped(exc)  # as an integration does when the task fails with it
                raise
            finally:
                agent.end_unit(handle)
        spans = exporter.get_finished_spans()
        assert [s.name for s in spans] == ["nightly-job"], [
            (s.name, dict(s.attributes or {})) for s in spans
        ]
        (span,) = spans
        (event,) = span.events
        assert event.name == "ctxtrace.out_of_context_access"
        attributes = dict(event.attributes or {})
        assert attributes["exception.type"] == "RuntimeError"
        assert "application context" in str(attributes["exception.message"])
        assert str(attributes["exception.stacktrace"]).startswith("Traceback")
        assert attributes["ctxtrace.proxy"] == "current_app"
        assert attributes["ctxtrace.phase"] == "runtime"
        assert attributes["ctxtrace.access.outcome"] == "escaped"
        assert attributes["code.file.path"] == __file__

    def test_own_short_span_otherwise(
        self, instrumented: Any, exporter: InMemorySpanExporter
    ) -> None:
        """With no recording span, the access makes a span of its own; ERROR only when the
        error escaped."""
        instrumented(metrics="none")
        agent = _agent.current()
        assert agent is not None
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018 - the failed access is the point
        agent.ledger.settle_now()  # outside any unit: told at the sweep, or now
        (span,) = exporter.get_finished_spans()
        assert span.name == "ctxtrace.out_of_context_access"
        assert span.status.status_code == StatusCode.UNSET
        attributes = dict(span.attributes or {})
        assert attributes["exception.type"] == "RuntimeError"
        assert attributes["ctxtrace.access.outcome"] == "handled"
        assert span.start_time == span.end_time

    def test_a_handled_access_joins_the_trace_it_happened_in(
        self, job_tracing: tuple[trace.Tracer, InMemorySpanExporter, Any]
    ) -> None:
        """Told when its unit ends, after the surrounding span ended: a child span of it."""
        tracer, exporter, agent = job_tracing
        handle = agent.begin_unit("task", "nightly")
        with tracer.start_as_current_span("lookup"), contextlib.suppress(RuntimeError):
            current_app.name  # noqa: B018 - the failed access is the point
        agent.end_unit(handle)
        by_name = {s.name: s for s in exporter.get_finished_spans()}
        access, lookup = by_name["ctxtrace.out_of_context_access"], by_name["lookup"]
        assert access.parent is not None and lookup.context is not None
        assert access.parent.span_id == lookup.context.span_id
        assert dict(access.attributes or {})["ctxtrace.access.outcome"] == "handled"


def test_log_lines_carry_the_trace(
    instrumented: Any,
    traced_app: Flask,
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An anomaly's log line names the trace and the span that was current."""
    instrumented(metrics="none")
    capsys.readouterr()
    traced_app.test_client().get("/wrong-pop")
    server = _server(exporter.get_finished_spans())
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (line,) = [entry for entry in lines if entry["event"] == "ctxtrace.wrong_pop"]
    assert line["trace_id"] == trace.format_trace_id(server.context.trace_id)
    assert line["span_id"] == trace.format_span_id(server.context.span_id)


def test_no_trace_no_ids(instrumented: Any, app: Flask, capsys: pytest.CaptureFixture[str]) -> None:
    """Without any span around, log lines have no trace fields (rather than zeros)."""
    instrumented(metrics="none")
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        current_app.name  # noqa: B018 - the failed access is the point
    agent = _agent.current()
    assert agent is not None
    agent.ledger.settle_now()  # outside any unit: told at the sweep, or now
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert "trace_id" not in line and "span_id" not in line

