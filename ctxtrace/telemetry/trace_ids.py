"""Trace and span ids for log lines, so a person can go from a log line to its trace.

``enrich`` is handed to the log emitter. It names the span that was current when
the event happened (the event is dispatched on the thread where it happened; an
out-of-context access, told later, carries the span current at the access);
for events found later by the watchdog, where nothing is current, it names the
span the context was pushed under, from the carry the ledger kept.
"""

from __future__ import annotations

from opentelemetry import trace

from ctxtrace._events import Anomaly, ContextPopped, ContextPushed, Event, OutOfContextAccess
from ctxtrace.telemetry import tracecarry


def enrich(event: Event) -> dict[str, str]:
    """``{"trace_id", "span_id"}`` in the W3C hex form, or nothing when no span is known."""
    if isinstance(event, OutOfContextAccess) and event.carry is not None:
        # Told when its unit ended: the span current at the access, not the one now.
        span_context = trace.get_current_span(tracecarry.otel_part(event.carry)).get_span_context()
    else:
        span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid and isinstance(event, Anomaly | ContextPushed | ContextPopped):
        parent = tracecarry.parent_context(event.carry)
        if parent is not None:
            span_context = trace.get_current_span(parent).get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": trace.format_trace_id(span_context.trace_id),
        "span_id": trace.format_span_id(span_context.span_id),
    }
