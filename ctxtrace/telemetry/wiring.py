"""Wiring the telemetry emitters (metrics, spans) into an host.

The host asks two things: what the ledger must collect for them (push/pop
events and one event per request only for ``CTXTRACE_SPANS=all``; the
OpenTelemetry context at each push unless spans are off), and the emitters
themselves. The metrics emitter always
exists (it also drains the ledger's duration buffer); the span emitter only
when spans are not off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctxtrace._config import Config
from ctxtrace.telemetry import tracecarry
from ctxtrace.telemetry.metrics import MetricsEmitter
from ctxtrace.telemetry.spans import SpanEmitter

if TYPE_CHECKING:
    from ctxtrace._host import Host


@dataclass(frozen=True, slots=True)
class LedgerNeeds:
    """Ledger constructor arguments the telemetry layer needs."""

    lifecycle: bool
    requests: bool
    capture: Callable[..., object] | None


def one_span_per_request(config: Config) -> bool:
    """``CTXTRACE_SPANS=all`` folds a request's own contexts into one span, unless every
    push and pop is logged (``CTXTRACE_LOG_LIFECYCLE``), which tracks them one by one."""
    return config.spans == "all" and not config.log_lifecycle


def ledger_needs(config: Config) -> LedgerNeeds:
    return LedgerNeeds(
        lifecycle=config.spans == "all",
        requests=one_span_per_request(config),
        capture=tracecarry.capture if config.spans != "off" else None,
    )


def emitters(host: Host) -> list[Any]:
    """The metrics emitter and, unless spans are off, the span emitter."""
    if host.config.spans == "off":
        return [MetricsEmitter(host)]
    spans = SpanEmitter(host, host.config.spans, one_span_per_request(host.config))
    return [MetricsEmitter(host, dropped_spans=lambda: spans.dropped), spans]
