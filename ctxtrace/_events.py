"""What the ledger tells the emitters.

Events are immutable records built only when something needs them: an anomaly,
or a push/pop that a subscriber (DEBUG logs, ``CTXTRACE_SPANS=all``) asked for.
They carry code locations, names and counts, never request data: the emitters
can put every field into telemetry without filtering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

Kind = Literal["app", "request"]
AnomalyName = Literal[
    "leaked", "long_lived", "wrong_pop", "double_pop", "foreign_pop", "stale_context"
]
Phase = Literal["import", "runtime"]
#: Whether an out-of-context access's ``RuntimeError`` reached the boundary of its unit of
#: work (a request's 500, a failed task, job, command, thread or test) or the
#: application caught it (a ``try``/``except`` fallback, ``pytest.raises``).
Outcome = Literal["escaped", "handled"]
OUTCOMES: tuple[Outcome, ...] = ("escaped", "handled")


@dataclass(frozen=True, slots=True)
class AnomalyKind:
    """One kind of anomaly, declared once: config, logs, the report and the dashboards read it.

    Adding a kind means a detector in the ledger, a row here, its name in
    ``AnomalyName`` (a type checker needs the literal) and its ``detect_`` field on
    ``Config``; the tests hold the three in step.
    """

    name: str
    #: The log level of its ``ctxtrace.<name>`` line.
    level: Literal["error", "warning"]
    #: The ``CTXTRACE_DETECT_<NAME>`` option's sentence in the README.
    detects: str
    #: The general fix (the runbook's "Fix" line, shown by ``ctxtrace report``).
    fix: str
    #: Its colour in the report's plots, the same in every panel.
    colour: str
    #: Whether it is detected unless configured otherwise.
    default_on: bool = True


#: Every anomaly kind, in the order reports list them. Out-of-context access is the
#: last; it has an event type of its own (``OutOfContextAccess``).
ANOMALY_KINDS: tuple[AnomalyKind, ...] = (
    AnomalyKind(
        "leaked", "error",
        "Report contexts still pushed when their unit of work ends.",
        "Push and pop with `with app.app_context():` (never a bare push()); in threads, "
        "push a fresh context there; in CLI commands, use `with_appcontext`.",
        "#e45756",
    ),
    AnomalyKind(
        "long_lived", "warning",
        "Report contexts alive longer than the long_lived ages.",
        "Move slow work out of the request, put timeouts on downstream calls, and "
        "push one short context per item in batch jobs.",
        "#eeca3b",
    ),
    AnomalyKind(
        "wrong_pop", "error",
        "Report a pop while another context is on top.",
        "Pair every push with its pop in one `with` block; nested `with` blocks pop "
        "newest first by construction. `top_site` is usually the culprit.",
        "#b279a2",
    ),
    AnomalyKind(
        "double_pop", "error",
        "Report a pop of a context that is not pushed.",
        "One owner per context: use `with` and delete the manual pops.",
        "#9d755d",
    ),
    AnomalyKind(
        "foreign_pop", "error",
        "Report a pop in another thread or Context than the push.",
        "Never move a context between threads: push a new one where the work runs "
        "(ctxtrace.run_in_app_context).",
        "#72b7b2",
    ),
    AnomalyKind(
        "stale_context", "error",
        "Report a unit that starts with an earlier unit's context.",
        "Fix the leak at `site` (see leaked); CTXTRACE_REPAIR=true pops leaked "
        "contexts at the end of their unit meanwhile.",
        "#f58518",
    ),
    AnomalyKind(
        "out_of_context_access", "warning",
        "Report proxy use with no context.",
        "Pass the app or the config explicitly into threads and "
        "`with app.app_context():` there; no module-level proxy access; `with_appcontext` for "
        "CLI commands.",
        "#54a24b",
    ),
)
#: Every anomaly name except out-of-context access, which has its own event type.
ANOMALIES: tuple[AnomalyName, ...] = tuple(
    cast(AnomalyName, kind.name) for kind in ANOMALY_KINDS if kind.name != "out_of_context_access"
)
#: The proxies whose failed lookups are reported.
PROXIES: tuple[str, ...] = ("current_app", "g", "request", "session", "app_ctx", "request_ctx")


@dataclass(frozen=True, slots=True)
class Site:
    """A place in the code: where a context was pushed or a proxy was touched.

    ``endpoint`` is set instead of a file for the contexts Flask pushes itself
    while dispatching a request, where the endpoint says more than Flask's own line.
    """

    file: str
    line: int
    function: str
    module: str = ""
    endpoint: str | None = None
    #: The installed package's (or standard library's) frame nearest to the event,
    #: when the application reached Flask through one (Flask-SQLAlchemy, say).
    via: Site | None = None

    def __str__(self) -> str:
        if self.endpoint is not None:
            return f"endpoint:{self.endpoint}"
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Unit:
    """A piece of work a leak is measured against: a request, task, command or thread."""

    id: int
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """A snapshot of one tracked context, taken when an event is made."""

    id: int
    kind: Kind
    app: str
    site: Site | None
    thread_id: int
    thread_name: str
    pushed_ns: int
    depth: int
    push_count: int
    unit: Unit | None
    streaming: bool = False


@dataclass(frozen=True, slots=True)
class FlightRecord:
    """One push or pop in a thread's recent history."""

    op: Literal["push", "pop"]
    kind: Kind
    context_id: int
    site: Site | None
    thread_name: str


# ``carry`` is whatever the telemetry layer captured at push (the OpenTelemetry
# context, and for spans the request's environ). It is for building spans only:
# kept out of repr and equality so it can never leak into a log line or a test diff.
def _carry() -> object:
    return field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ContextPushed:
    """A context was pushed (only made when a subscriber wants lifecycle events)."""

    context: ContextInfo
    carry: object = _carry()


@dataclass(frozen=True, slots=True)
class ContextPopped:
    """A context was popped for the last time (lifecycle subscribers only)."""

    context: ContextInfo
    duration_s: float
    carry: object = _carry()


@dataclass(frozen=True, slots=True)
class RequestServed:
    """A request unit ended (``CTXTRACE_SPANS=all``): one span stands for the contexts
    Flask pushed to dispatch it, the app context Flask <= 3.1 pushes for it included.

    ``contexts`` is how many those were (2 on Flask <= 3.1, else 1). ``open`` says
    that one of them outlives the unit (a streamed response, a leak): it gets a span
    of its own when it is popped. ``pushed_ns`` is the monotonic clock.
    """

    unit: Unit
    app: str
    pushed_ns: int
    duration_s: float
    contexts: int
    open: bool
    carry: object = _carry()


@dataclass(frozen=True, slots=True)
class Anomaly:
    """The stack went wrong.

    ``context`` is the context the anomaly is about; ``other`` is, for a wrong
    pop, the context that was on top (usually the culprit), and for a stale
    context, nothing. ``reason`` says how a leak was found (``unit_end``,
    ``thread_end``, ``collected``, ``exit``), and ``import`` marks the
    ``long_lived`` context a module's body pushed while it was imported.
    """

    name: AnomalyName
    context: ContextInfo
    flight: tuple[FlightRecord, ...]
    at_ns: int
    thread_name: str
    other: ContextInfo | None = None
    unit: Unit | None = None
    reason: str = ""
    repaired: bool = False
    carry: object = _carry()


@dataclass(frozen=True, slots=True)
class OutOfContextAccess:
    """A proxy was used with no context and the ``RuntimeError`` reached the caller.

    It is told once its unit of work ends, when ``outcome`` is known: ``escaped``
    when the error (or one it caused) failed the unit, ``handled`` when the
    application caught it. An access outside any unit is told at the agent's next
    sweep: ``handled`` when the frame that caught it is the application's own.
    """

    proxy: str
    site: Site | None
    phase: Phase
    thread_name: str
    exc_type: str
    exc_message: str
    unit: Unit | None
    flight: tuple[FlightRecord, ...]
    at_ns: int
    parent_unit: Unit | None = None
    outcome: Outcome = "escaped"
    carry: object = _carry()
    #: Accesses like this one (site, proxy, phase, outcome) that were only counted
    #: since the last one reported: repeats inside a report window (``core.accesses``).
    counted_since_last: int = 0
    #: Not an occurrence: it stands for ``counted_since_last`` accesses that no report
    #: mentioned by the time their window passed or the process ended.
    summary: bool = False


Event = ContextPushed | ContextPopped | RequestServed | Anomaly | OutOfContextAccess
