"""What a push carries to its span: OpenTelemetry's context at the push."""

from __future__ import annotations

from contextvars import ContextVar

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.sdk.trace import TracerProvider

from ctxtrace.telemetry import tracecarry


class _OtherRuntime:
    """A runtime context that is not OpenTelemetry's ContextVar one (``OTEL_PYTHON_CONTEXT``).

    It has a ContextVar under the same private name, holding something else: only
    the runtime's type may decide that the fast getter is safe.
    """

    def __init__(self) -> None:
        self.current = Context({"from": "other runtime"})
        self._current_context: ContextVar[Context | None] = ContextVar("impostor", default=None)

    def get_current(self) -> Context:
        return self.current


def test_capture_sees_the_span_current_at_push() -> None:
    """With the default runtime, the fast getter returns what ``get_current`` returns."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        carried = tracecarry.capture()
        assert tracecarry.otel_part(carried) is otel_context.get_current()
        assert trace.get_current_span(tracecarry.otel_part(carried)) is span
    assert trace.get_current_span(tracecarry.otel_part(tracecarry.capture())) is not span


def test_another_runtime_context_is_read_through_the_public_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime context of another kind is never read behind its back."""
    other = _OtherRuntime()
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", other)
    getter = tracecarry._context_getter()
    assert getter is otel_context.get_current
    assert getter() is other.current
