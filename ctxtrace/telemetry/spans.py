"""Spans: one per context lifetime, ``flask.app_context`` or ``flask.request_context``.

``CTXTRACE_SPANS=anomalies`` (the default) makes a span only for a context that
runs into an anomaly, when the anomaly event arrives: nothing happens for
healthy contexts. The span is back-dated to the push (``ContextInfo.pushed_ns``
is the monotonic clock; one offset taken at start turns it into the epoch time
OpenTelemetry wants), its parent is the OpenTelemetry context captured at the
push, it carries an ERROR status and an event ``ctxtrace.<anomaly>``, and it
ends when the anomaly is found.

``CTXTRACE_SPANS=all`` makes one span per unit of work. A request's is made when
the request ends (``RequestServed``), from the push of its request context: the
contexts Flask pushes to dispatch it (two on Flask <= 3.1) are folded into it,
with four attributes, and so are anomalies of theirs seen before their pop. Any
other context (an explicit ``with app.app_context()``, a task's) gets a span of
its own, started and ended when it is popped, with the push time as its start;
so does one of a request's own contexts that outlives the request (a streamed
response, a leak). Either way the parent can be the server span OpenTelemetry's
Flask instrumentation starts only after Flask pushed the request context (see
``tracecarry``). The tracer provider's sampler decides as for any other span.
Anomalies seen before the pop become events on the span; a leaked context's span
is ended when the leak is found.

An out-of-context access becomes an event on the current span when one is
recording, else a short span ``ctxtrace.out_of_context_access`` of its own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ctxtrace._events import (
    Anomaly,
    ContextInfo,
    ContextPopped,
    ContextPushed,
    Event,
    OutOfContextAccess,
    RequestServed,
)
from ctxtrace._version import VERSION
from ctxtrace.core.counters import read_count
from ctxtrace.core.guard import run_within
from ctxtrace.core.names import safe_name
from ctxtrace.telemetry import providers, tracecarry
from ctxtrace.telemetry.inherited import Inherited
from ctxtrace.telemetry.logs import log_line

if TYPE_CHECKING:
    from ctxtrace._host import Host
    from ctxtrace.telemetry.sdk_providers import PrivateTracing

SPAN_NAMES: Final = {"app": "flask.app_context", "request": "flask.request_context"}
ACCESS_SPAN: Final = "ctxtrace.out_of_context_access"
#: How often, at most, a process without the application's TracerProvider looks again.
RECHECK_S: Final = 1.0
#: Contexts followed at once in ``all`` mode (anomalies waiting for the pop, routes).
MAX_TRACKED: Final = 10_000
# Anomalies after which the context's life is over (no pop will follow).
_FINAL: Final = frozenset(("leaked", "double_pop"))


def _exception_stacktrace(event: OutOfContextAccess) -> str:
    """A traceback in Python's own format, down to the line that touched the proxy."""
    last = f"{event.exc_type}: {event.exc_message}"
    site = event.site
    if site is None or not site.file:
        return last
    return (
        "Traceback (most recent call last):\n"
        f'  File "{site.file}", line {site.line}, in {site.function}\n{last}'
    )


class _Bounded(dict[int, Any]):
    """A dict that forgets its oldest entries past a size (insertion order)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: int, value: Any) -> list[tuple[int, Any]]:
        self[key] = value
        evicted: list[tuple[int, Any]] = []
        while len(self) > self.limit:
            try:
                oldest = next(iter(self))
            except (StopIteration, RuntimeError):  # another thread changed it meanwhile
                break
            evicted.append((oldest, self.pop(oldest, None)))
        return evicted


class SpanEmitter:
    """Turns anomalies (and, in ``all`` mode, every context) into spans."""

    name: Final = "spans"

    def __init__(self, host: Host, mode: str, per_request: bool = False) -> None:
        self._host = host
        self._all = mode == "all"
        # ``all`` mode with ``RequestServed`` events: a request's own contexts fold into its span.
        self._per_request = per_request
        self._offset = time.time_ns() - time.monotonic_ns()
        self._tracer: trace.Tracer | None = None
        self._provider: Any = None
        self.private: PrivateTracing | None = None
        self._recheck_at = 0.0
        self._lock = threading.Lock()
        # A forked child's inherited private provider, until the child's own replaces it.
        # By then the SDK has restarted its batch processors and emptied their queues, so
        # shutting the inherited one down sends none of the parent's spans.
        self._inherited: Inherited[PrivateTracing] = Inherited(
            lambda old: old.shutdown(), self._choose_tracer,
            lambda exc: self._host.errors.record(self.name, exc),
        )
        # ``all`` mode: anomalies waiting for their context's pop, the environ of
        # each request unit (for the app context a request pushes before itself),
        # contexts whose span a leak already ended.
        self._pending = _Bounded(MAX_TRACKED)
        self._unit_environ = _Bounded(MAX_TRACKED)
        self._ended = _Bounded(MAX_TRACKED)
        # One span per request: anomalies of its own contexts popped before it ended,
        # and the requests that ended with one of them still pushed, by unit id.
        self._folded = _Bounded(MAX_TRACKED)
        self._open_units = _Bounded(MAX_TRACKED)
        self._clean_routes: dict[str, str] = {}
        self._route_cache: dict[tuple[str, str], str] = {}
        self.dropped_counter = itertools.count()
        self._said_dropped = False

    @property
    def dropped(self) -> int:
        return read_count(self.dropped_counter)

    def _queue_dropped(self) -> None:
        """A span the private batch queue turned away: counted, and said once."""
        next(self.dropped_counter)
        if not self._said_dropped:
            self._said_dropped = True
            log_line(
                "warning", "ctxtrace.spans_dropped", worker=self._host.worker,
                note="the span queue is full (is the collector down?); drops are counted"
                ' in ctxtrace_dropped_total{what="span"} and not logged again',
            )

    # -- providers ----------------------------------------------------------

    def start(self) -> None:
        try:
            self._choose_tracer()
        except Exception as exc:
            self._host.errors.record(self.name, exc)

    def _choose_tracer(self) -> None:
        """The global TracerProvider if set, else a private one if an exporter is named."""
        provider = providers.global_tracer_provider()
        if provider is None:
            host = self._host
            self.private = providers.build_tracing(
                host.worker, providers.environ(), host.errors.record, self._queue_dropped
            )
            provider = self.private.provider if self.private is not None else None
        self._provider = provider
        self._tracer = provider.get_tracer(providers.SCOPE, VERSION) if provider else None
        self._recheck_at = time.monotonic() + RECHECK_S

    def _tracer_now(self) -> trace.Tracer | None:
        """The tracer; without the application's own, look for it again now and then."""
        if self._inherited.held is not None:
            # A forked child's first span: its own provider now, not after the timer.
            self._inherited.replace()
        tracer = self._tracer
        if self.private is None and tracer is not None:
            return tracer
        now = time.monotonic()
        if now < self._recheck_at:
            return tracer
        with self._lock:
            self._recheck_at = now + RECHECK_S
            provider = providers.global_tracer_provider()
            if provider is None or provider is self._provider:
                return self._tracer
            private, self.private = self.private, None
            self._provider = provider
            self._tracer = provider.get_tracer(providers.SCOPE, VERSION)
        if private is not None:
            # Off this thread: a shutdown exports what is queued.
            threading.Thread(target=private.shutdown, name="ctxtrace-retire", daemon=True).start()
        return self._tracer

    def flush(self, timeout_s: float) -> None:
        """Export what waits, within ``timeout_s`` even while an exporter hangs."""
        if self._inherited.held is not None:
            self._inherited.replace()
        private = self.private
        if private is not None:
            private.flush(timeout_s)
            return
        provider = self._provider
        if provider is not None and hasattr(provider, "force_flush"):
            millis = int(max(timeout_s, 0.001) * 1000)
            run_within(
                timeout_s, lambda: provider.force_flush(millis), self.name,
                self._host.errors.record,
            )

    def stop(self, timeout_s: float) -> None:
        # Contexts still waiting for a pop that will never be seen: end them now.
        for cid, anomalies in list(self._pending.items()):
            self._pending.pop(cid, None)
            self._context_span(anomalies[-1].context, anomalies[-1].carry, None, anomalies)
        private, self.private = self.private, None
        if private is not None:
            # The shutdown exports what is queued first.
            private.shutdown(timeout_s)
        elif self._provider is not None:
            self.flush(timeout_s)
        self._tracer = self._provider = None

    def renamed(self) -> None:
        """The worker's name changed: a private provider's Resource names it, so one of
        the new name replaces it (the old one exports what it holds as it goes)."""
        private = self.private
        if private is not None:
            self._tracer = self._provider = None
            self.private = None
            self._inherited.renew(private)

    def after_fork(self) -> None:
        """A forked child: nothing of the parent's is followed; its own provider if private."""
        self._lock = threading.Lock()  # may have been held by another thread at fork
        followed = (self._pending, self._unit_environ, self._ended, self._folded, self._open_units)
        for table in followed:
            table.clear()
        self._offset = time.time_ns() - time.monotonic_ns()
        inherited, self.private = self.private, None
        if inherited is not None:
            # Not here, inside os.fork(): building a provider takes locks that only
            # later fork hooks release. The child's first span or flush builds it, or
            # this timer does, whichever comes first.
            self._tracer = self._provider = None
            self._inherited.hold(inherited)
            timer = threading.Timer(RECHECK_S, self._inherited.replace)
            timer.daemon = True
            timer.start()

    # -- events ---------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if isinstance(event, ContextPopped):
            self._popped(event)
        elif isinstance(event, RequestServed):
            self._request_span(event)
        elif isinstance(event, ContextPushed):
            self._pushed(event)
        elif isinstance(event, Anomaly):
            self._anomaly(event)
        elif isinstance(event, OutOfContextAccess):
            self._access(event)

    def _pushed(self, event: ContextPushed) -> None:
        info = event.context
        if info.kind == "request" and info.unit is not None:
            environ = tracecarry.environ_part(event.carry)
            if environ is not None:
                self._track(self._unit_environ, info.unit.id, environ)

    def _popped(self, event: ContextPopped) -> None:
        info = event.context
        if self._ended.pop(info.id, None) is not None:
            return
        anomalies: Sequence[Anomaly] = self._pending.pop(info.id, ())
        if self._folds(info):
            unit = info.unit
            if anomalies and unit is not None:
                self._track(self._folded, unit.id, [*self._folded.get(unit.id, ()), *anomalies])
            return
        end = self._epoch(info.pushed_ns) + int(event.duration_s * 1e9)
        self._context_span(info, event.carry, end, anomalies)
        if info.kind == "request" and info.unit is not None:
            self._unit_environ.pop(info.unit.id, None)

    def _folds(self, info: ContextInfo) -> bool:
        """Whether ``info`` is a request's own context whose span is its request's."""
        unit = info.unit
        return (
            self._per_request
            and unit is not None
            and unit.kind == "request"
            and info.site is not None
            and info.site.endpoint is not None
            and unit.id not in self._open_units
        )

    def _anomaly(self, event: Anomaly) -> None:
        info = event.context
        if not self._all or info.id == 0 or info.id in self._ended:
            self._context_span(info, event.carry, None, (event,), in_anomaly=True)
            return
        waiting: list[Anomaly] = [*self._pending.pop(info.id, ()), event]
        if event.name in _FINAL:
            self._context_span(info, event.carry, None, waiting, in_anomaly=True)
            # A repaired leak is popped next: its span is already ended.
            self._track(self._ended, info.id, True)
        else:
            self._track(self._pending, info.id, waiting)

    def _track(self, table: _Bounded, key: int, value: Any) -> None:
        for _, evicted in table.put(key, value):
            next(self.dropped_counter)
            if table is self._pending or table is self._folded:
                self._context_span(evicted[-1].context, evicted[-1].carry, None, evicted)

    # -- making spans -------------------------------------------------------------

    def _epoch(self, monotonic_ns: int) -> int:
        return monotonic_ns + self._offset

    def _context_span(
        self,
        info: ContextInfo,
        carry: object,
        end_ns: int | None,
        anomalies: Sequence[Anomaly],
        *,
        in_anomaly: bool = False,
    ) -> None:
        tracer = self._tracer_now()
        if tracer is None:
            return
        parent = tracecarry.parent_context(carry, self._request_environ(info, carry, in_anomaly))
        route = self._route(info, carry) if info.kind == "request" else None
        outcome = anomalies[-1].name if anomalies else "popped"
        start = self._epoch(info.pushed_ns if info.pushed_ns else anomalies[0].at_ns)
        span = tracer.start_span(
            SPAN_NAMES.get(info.kind, "flask.app_context"),
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=(
                self._attributes(info, outcome, route)
                if anomalies
                else self._healthy_attributes(info, route)
            ),
            start_time=start,
        )
        self._mark(span, anomalies)
        span.end(end_time=end_ns if end_ns is not None else time.time_ns())

    def _request_span(self, event: RequestServed) -> None:
        """A request's one span: its own contexts' lifetime, four attributes, their anomalies."""
        unit = event.unit
        if event.open:
            self._track(self._open_units, unit.id, True)
        anomalies: Sequence[Anomaly] = self._folded.pop(unit.id, ())
        tracer = self._tracer_now()
        if tracer is None:
            return
        attributes: dict[str, Any] = {
            "flask.app.name": event.app,
            "flask.endpoint": unit.name,
            "ctxtrace.contexts": event.contexts,
        }
        route = tracecarry.route_of(event.carry)
        if route is not None:
            attributes["http.route"] = self._clean_route(route)
        start = self._epoch(event.pushed_ns)
        span = tracer.start_span(
            SPAN_NAMES["request"],
            context=tracecarry.parent_context(event.carry),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start,
        )
        self._mark(span, anomalies)
        span.end(end_time=start + int(event.duration_s * 1e9))

    def _clean_route(self, route: str) -> str:
        """The app's URL rule, cleaned like every name (longer bound), once per rule."""
        clean = self._clean_routes.get(route)
        if clean is None:
            clean = safe_name(route, 512)
            if len(self._clean_routes) < 4096:
                self._clean_routes[route] = clean
        return clean

    def _mark(self, span: trace.Span, anomalies: Sequence[Anomaly]) -> None:
        """Each anomaly as an event on ``span``, and the last one as its ERROR status."""
        if anomalies and span.is_recording():
            for anomaly in anomalies:
                span.add_event(
                    f"ctxtrace.{anomaly.name}",
                    attributes=self._anomaly_attributes(anomaly),
                    timestamp=self._epoch(anomaly.at_ns),
                )
            last = anomalies[-1]
            reason = f" ({last.reason})" if last.reason else ""
            span.set_status(Status(StatusCode.ERROR, f"{last.name}{reason}"))

    def _request_environ(
        self, info: ContextInfo, carry: object, in_anomaly: bool
    ) -> Mapping[str, Any] | None:
        """For an app context a request pushed for itself: that request's environ."""
        if info.kind != "app" or tracecarry.environ_part(carry) is not None:
            return None
        if info.unit is not None:
            environ: Mapping[str, Any] | None = self._unit_environ.get(info.unit.id)
            if environ is not None:
                return environ
        # Found while the request pops it (a wrong pop): the request is up the stack.
        return tracecarry.dispatching_environ() if in_anomaly else None

    def _route(self, info: ContextInfo, carry: object) -> str | None:
        route = tracecarry.route_of(carry)
        endpoint = info.site.endpoint if info.site is not None else None
        if endpoint is None:
            return route
        key = (info.app, endpoint)
        if route is not None:
            if len(self._route_cache) < 4096:
                self._route_cache[key] = route
            return route
        route = self._route_cache.get(key) or tracecarry.route_for_endpoint(info.app, endpoint)
        if route is not None and len(self._route_cache) < 4096:
            self._route_cache[key] = route
        return route

    def _healthy_attributes(self, info: ContextInfo, route: str | None) -> dict[str, Any]:
        """A healthy context's span (``all`` mode, every explicit push): at most four
        attributes, as each one costs on every span; the worker is on the Resource of
        ctxtrace's own provider, the kind in the span's name."""
        attributes: dict[str, Any] = {"flask.app.name": info.app}
        site = info.site
        if site is not None and site.endpoint is not None:
            attributes["flask.endpoint"] = site.endpoint
            if route is not None:
                attributes["http.route"] = self._clean_route(route)
        elif site is not None and site.file:
            attributes["code.function.name"] = site.function
            attributes["code.file.path"] = site.file
            attributes["code.line.number"] = site.line
        return attributes

    def _attributes(self, info: ContextInfo, outcome: str, route: str | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "flask.app.name": info.app,
            "flask.context.kind": info.kind,
            "ctxtrace.context.id": info.id,
            "ctxtrace.context.depth": info.depth,
            "ctxtrace.worker.id": self._host.worker,
            "ctxtrace.outcome": outcome,
            "thread.id": info.thread_id,
            "thread.name": info.thread_name,
        }
        site = info.site
        if site is not None:
            if site.endpoint is not None:
                attributes["flask.endpoint"] = site.endpoint
            if site.file:
                attributes["code.function.name"] = site.function
                attributes["code.file.path"] = site.file
                attributes["code.line.number"] = site.line
        if route is not None:
            attributes["http.route"] = self._clean_route(route)
        return attributes

    @staticmethod
    def _anomaly_attributes(event: Anomaly) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "ctxtrace.anomaly": event.name,
            "thread.name": event.thread_name,
            "ctxtrace.flight": [
                f"{r.op} {r.kind}#{r.context_id} at {r.site or '?'} on {r.thread_name}"
                for r in event.flight
            ],
        }
        if event.reason:
            attributes["ctxtrace.reason"] = event.reason
        if event.unit is not None:
            attributes["ctxtrace.unit"] = f"{event.unit.kind}:{event.unit.name}"
        if event.repaired:
            attributes["ctxtrace.repaired"] = True
        other = event.other
        if other is not None:
            attributes["ctxtrace.top.context.id"] = other.id
            attributes["ctxtrace.top.kind"] = other.kind
            if other.site is not None:
                attributes["ctxtrace.top.site"] = str(other.site)
        return attributes

    def _access(self, event: OutOfContextAccess) -> None:
        if event.summary:
            return  # not an occurrence: its count is in the metrics and the log summary
        attributes: dict[str, Any] = {
            "exception.type": event.exc_type,
            "exception.message": event.exc_message,
            "exception.stacktrace": _exception_stacktrace(event),
            "ctxtrace.proxy": event.proxy,
            "ctxtrace.phase": event.phase,
            "ctxtrace.access.outcome": event.outcome,
            "ctxtrace.worker.id": self._host.worker,
            "thread.name": event.thread_name,
        }
        site = event.site
        if site is not None and site.file:
            attributes["code.function.name"] = site.function
            attributes["code.file.path"] = site.file
            attributes["code.line.number"] = site.line
            if site.via is not None:
                attributes["ctxtrace.library_site"] = str(site.via)
        if event.counted_since_last:
            attributes["ctxtrace.suppressed_since_last"] = event.counted_since_last
        when = self._epoch(event.at_ns)
        # The span that was current at the access: its outcome is told later (a
        # handled one when its unit ends), when that span may have ended.
        parent = tracecarry.otel_part(event.carry)
        current = trace.get_current_span(parent)
        if current.is_recording():
            current.add_event(ACCESS_SPAN, attributes=attributes, timestamp=when)
            return
        tracer = self._tracer_now()
        if tracer is None:
            return
        span = tracer.start_span(
            ACCESS_SPAN, context=parent, attributes=attributes, start_time=when
        )
        if event.outcome == "escaped":
            span.set_status(Status(StatusCode.ERROR, event.exc_message))
        span.end(end_time=when)
