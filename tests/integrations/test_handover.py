"""Handing work to threads with run_in_app_context and ContextExecutor: app, g, trace, cleanup."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, current_app, g
from flask import globals as flask_globals
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ctxtrace import ContextExecutor, run_in_app_context


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A private tracer provider (the global one stays untouched) and its finished spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("ctxtrace-tests"), exporter
    provider.shutdown()


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def in_thread(target: Callable[[], Any]) -> None:
    thread = threading.Thread(target=target, name="handover")
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


class TestRunInAppContext:
    """The decorator, used where a request hands work to a thread."""

    def test_thread_sees_the_app_its_own_g_and_joins_the_trace(
        self, app: Flask, spans: Any, instrumented: Any
    ) -> None:
        """current_app works, g is the thread's own, the span is a child of the request's."""
        recorder = instrumented()
        tracer, exporter = spans
        seen: dict[str, Any] = {}

        def send_receipt(order: int) -> None:
            with tracer.start_as_current_span("send_receipt"):
                seen["app"] = current_app.name
                seen["g_before"] = g.get("marker")
                g.marker = f"receipt-{order}"
                seen["ctx"] = flask_globals._cv_app.get(None)

        @app.route("/orders", methods=["POST"])
        def create_order() -> str:
            with tracer.start_as_current_span("create_order"):
                g.marker = "request"
                seen["request_ctx"] = flask_globals._cv_app.get(None)
                thread = threading.Thread(target=run_in_app_context(send_receipt), args=(7,))
                thread.start()
                thread.join(10)
                return str(g.marker)

        response = app.test_client().post("/orders")
        assert response.get_data(as_text=True) == "request"  # the thread's g is not the request's
        assert seen["app"] == "shop"
        assert seen["g_before"] is None
        assert seen["ctx"] is not seen["request_ctx"]  # a fresh context, never the request's
        by_name = finished(exporter)
        child, parent = by_name["send_receipt"], by_name["create_order"]
        assert child.parent is not None and parent.context is not None
        assert child.parent.span_id == parent.context.span_id
        assert child.context is not None and child.context.trace_id == parent.context.trace_id
        assert recorder.events == []

    def test_an_exception_still_pops_and_detaches_everything(
        self, app: Flask, spans: Any, instrumented: Any
    ) -> None:
        """The callable raises: the caller gets the error, the thread is left as it was."""
        recorder = instrumented()
        tracer, _ = spans
        after: dict[str, Any] = {}

        def explode() -> None:
            raise ValueError("no stock")

        with app.app_context(), tracer.start_as_current_span("request"):
            bound = run_in_app_context(explode)

        def thread_body() -> None:
            before = otel_context.get_current()
            with pytest.raises(ValueError, match="no stock"):
                bound()
            after["app_ctx"] = flask_globals._cv_app.get(None)
            after["otel_same"] = otel_context.get_current() == before
            after["span"] = trace.get_current_span()

        in_thread(thread_body)
        assert after["app_ctx"] is None
        assert after["otel_same"] is True
        assert after["span"] is trace.INVALID_SPAN
        assert recorder.events == []

    def test_outside_any_context_it_needs_the_app(self, app: Flask) -> None:
        """No app context where it is called: a clear error, or the app passed explicitly."""
        with pytest.raises(RuntimeError, match="needs an app"):
            run_in_app_context(lambda: None)
        names: list[str] = []
        in_thread(run_in_app_context(lambda: names.append(current_app.name), app=app))
        assert names == ["shop"]

    def test_keeps_the_callable_name(self, app: Flask) -> None:
        """The returned function looks like the callable (name, doc) for logs and tracebacks."""

        def send_receipt() -> None:
            """Send it."""

        with app.app_context():
            bound = run_in_app_context(send_receipt)
        assert (bound.__name__, bound.__doc__) == ("send_receipt", "Send it.")


class TestContextExecutor:
    """The executor wrapper, for concurrent.futures users."""

    def test_submit_and_map_run_in_the_app_and_the_trace(
        self, app: Flask, spans: Any, instrumented: Any
    ) -> None:
        """Every callable sees current_app and its spans are children of the submitter's."""
        recorder = instrumented()
        tracer, exporter = spans

        def price(item: int) -> str:
            with tracer.start_as_current_span(f"price-{item}"):
                return f"{current_app.name}:{item}"

        with ContextExecutor(max_workers=2) as pool:
            with app.test_request_context("/"), tracer.start_as_current_span("request"):
                first = pool.submit(price, 1)
                rest = list(pool.map(price, [2, 3]))
            assert [first.result(10), *rest] == ["shop:1", "shop:2", "shop:3"]
        by_name = finished(exporter)
        request = by_name["request"]
        assert request.context is not None
        for item in (1, 2, 3):
            parent = by_name[f"price-{item}"].parent
            assert parent is not None and parent.span_id == request.context.span_id
        assert recorder.events == []

    def test_exception_reaches_the_future_and_nothing_leaks(
        self, app: Flask, instrumented: Any
    ) -> None:
        """A failing callable: its future holds the error; the worker thread is clean after."""
        recorder = instrumented()

        def fail() -> None:
            raise KeyError("sku")

        def stack_is_empty() -> bool:
            return flask_globals._cv_app.get(None) is None

        with ContextExecutor(max_workers=1, app=app) as pool:
            with pytest.raises(KeyError):
                pool.submit(fail).result(10)
            # The same worker thread, without the wrapper: nothing was left pushed.
            assert pool._executor.submit(stack_is_empty).result(10)
        assert recorder.events == []

    def test_wraps_a_given_executor_and_shuts_it_down(self, app: Flask) -> None:
        """An executor passed in is used and owned: shutdown reaches it."""
        inner = ThreadPoolExecutor(max_workers=1)
        pool = ContextExecutor(inner, app=app)
        assert pool.submit(lambda: current_app.name).result(10) == "shop"
        pool.shutdown()
        with pytest.raises(RuntimeError):
            inner.submit(lambda: None)
        with pytest.raises(TypeError):
            ContextExecutor(inner, max_workers=2)
