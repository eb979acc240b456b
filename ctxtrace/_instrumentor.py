"""ctxtrace as an OpenTelemetry instrumentation.

The ``opentelemetry_instrumentor`` entry point ``ctxtrace`` names this class, so
``opentelemetry-instrument gunicorn app:app`` turns ctxtrace on with the rest of
the auto-instrumentation and ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ctxtrace``
leaves it off. Called directly it works like any instrumentor::

    CtxtraceInstrumentor().instrument(tracer_provider=tp, meter_provider=mp, spans="all")

Providers passed this way are used instead of the global ones; other keywords
are ctxtrace options (the ``CTXTRACE_*`` keys in lower case).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# The module is untyped (a file-wide ``type: ignore``), so mypy sees no names in it.
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)

from ctxtrace import _agent
from ctxtrace._config import OPTIONS
from ctxtrace.telemetry import providers

_OPTION_NAMES = frozenset(o.name for o in OPTIONS)


class CtxtraceInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # untyped base
    """Turns ctxtrace on and off through OpenTelemetry's instrumentation machinery."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("flask >= 2.3",)

    def _instrument(self, **kwargs: Any) -> None:
        providers.set_explicit(kwargs.get("tracer_provider"), kwargs.get("meter_provider"))
        options = {k: v for k, v in kwargs.items() if k in _OPTION_NAMES}
        _agent.start(options)

    def _uninstrument(self, **kwargs: Any) -> None:
        if _agent.current() is not None:
            _agent.stop()
        providers.set_explicit(None, None)
