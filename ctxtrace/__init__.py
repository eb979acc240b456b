"""ctxtrace: see every Flask context push and pop, and every way the stack goes wrong.

Turn it on with ``ctxtrace.instrument()`` (process-wide) or the Flask extension
``CtxTrace(app)``; anomalies become structlog events, OpenTelemetry spans and
metrics. Everything not listed in ``__all__`` is private.
"""

from __future__ import annotations

from typing import Any

from ctxtrace import _agent
from ctxtrace._config import Config, ConfigError
from ctxtrace._events import (
    ANOMALIES,
    Anomaly,
    ContextInfo,
    ContextPopped,
    ContextPushed,
    Event,
    FlightRecord,
    OutOfContextAccess,
    Site,
    Unit,
)
from ctxtrace._extension import CtxTrace
from ctxtrace._handover import ContextExecutor, run_in_app_context

__all__ = [
    "ANOMALIES",
    "Anomaly",
    "Config",
    "ConfigError",
    "ContextExecutor",
    "ContextInfo",
    "ContextPopped",
    "ContextPushed",
    "CtxTrace",
    "Event",
    "FlightRecord",
    "OutOfContextAccess",
    "Site",
    "Unit",
    "instrument",
    "is_instrumented",
    "run_in_app_context",
    "uninstrument",
]


def instrument(**options: Any) -> bool:
    """Hook every Flask app in this process; options are ``CTXTRACE_*`` keys in lower case.

    Returns whether this call turned ctxtrace on. A bad option raises
    ``ConfigError``; a bad ``CTXTRACE_*`` environment variable is logged once
    and leaves ctxtrace off, so the application still runs.
    """
    return _agent.start(options) is not None


def uninstrument() -> bool:
    """Remove every hook, restoring the identical original objects.

    Requests in flight on other threads finish untouched, their pops done by
    Flask's own methods; nothing they do from then on is reported.
    """
    return _agent.stop()


def is_instrumented() -> bool:
    """Whether ctxtrace is on in this process."""
    return _agent.current() is not None
