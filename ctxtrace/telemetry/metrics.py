"""Metrics: exact counts read at collection, and the context duration histogram.

Nothing here runs on the request path. Pushes, pops and live contexts are
counted by the ledger (``Ledger.snapshot()``); anomalies and out-of-context
accesses are counted here as their events arrive (every one of them, never
sampled); the agent counts its own errors. Observable instruments read all of
these when a reader collects, so every exporter sees ordinary OpenTelemetry
counters and gauges and a Prometheus scrape always sees exact numbers.

The duration histogram has a path of its own, because the SDK has no
asynchronous histogram and a ``Histogram.record`` costs several microseconds:
the ledger appends each finished context's lifetime to a bounded buffer; a
drain thread hands them to ``Histogram.record`` every second, and every
collection drains first (from its first callback), so what a reader exports
includes every context finished before it collected.

Recording is budgeted: a token bucket lets the drains spend ``FEED_CPU_SHARE``
of the process's time on ``record`` (bursts up to ``FEED_BURST_S`` of saved-up
time). Lifetimes beyond the budget are not recorded and are counted, exactly,
in ``ctxtrace_dropped_total{what="duration"}``, as are those the ledger's
buffer lost. So at every collection the histogram's count is the number of
finished contexts minus those dropped, and a flood of tiny requests costs the
process a bounded share of its time instead of a share that grows with it.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from ctxtrace._events import ANOMALIES, OUTCOMES, PROXIES, Anomaly, Event, OutOfContextAccess
from ctxtrace._version import VERSION
from ctxtrace.core.counters import ExactCounts
from ctxtrace.core.guard import run_within
from ctxtrace.telemetry import providers
from ctxtrace.telemetry.inherited import Inherited

if TYPE_CHECKING:
    from ctxtrace._host import Host
    from ctxtrace.telemetry.sdk_providers import PrivateMetrics

#: Histogram bucket boundaries, in seconds: 100 us to 60 s.
BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Seconds between drains of the ledger's duration buffer.
DRAIN_INTERVAL_S: Final = 1.0
#: Share of the process's time the drains may spend recording durations. At
#: about 8 us a record (opentelemetry-sdk 1.45, three attributes) 2 % is some
#: 2,500 contexts a second, sustained: more than a Flask worker serves, less
#: than a benchmark of empty requests makes.
FEED_CPU_SHARE: Final = 0.02
#: Most recording time the bucket saves up, in seconds (some 6,000 records): a
#: burst after a quiet spell is recorded whole, yet one drain never holds the
#: GIL long enough to be felt by the requests.
FEED_BURST_S: Final = 0.05
#: Most lifetimes one drain takes, so that a drain ends even while requests keep
#: finishing faster than it counts (it never does, by a wide margin: a bound).
MAX_TAKE: Final = 1 << 18
PHASES: Final = ("import", "runtime")
#: Seconds the deepest-stack gauge remembers a depth: every reader that collects within
#: this time after a spike sees it (an HA pair of Prometheus servers, ``ctxtrace report``,
#: a curl), where a reset-on-read gauge gave it to whichever came first. Longer than the
#: usual 15 s scrape interval by a margin; the dashboard takes max_over_time on top.
DEPTH_WINDOW_S: Final = 60.0
#: Width of one slot of that window, in seconds (the window keeps a handful of slots).
DEPTH_SLOT_S: Final = 15.0
#: Components whose error counters exist from the start, at 0: the hook layer, the ledger
#: and its watchdog, and the emitters. Others (exporters, integrations) appear with their
#: first error.
CORE_COMPONENTS: Final = ("hooks", "ledger", "watchdog", "metrics", "spans", "logs")
_MAX_APPS: Final = 64
_OTHER: Final = "other"


class DepthWindow:
    """The deepest stack of the last ``DEPTH_WINDOW_S`` seconds, for any number of readers.

    The ledger hands its maximum over and resets it (``take_depth_max``); each reading
    goes into a slot of ``DEPTH_SLOT_S`` seconds, and a reader gets the largest of the
    slots still inside the window. Reading never takes a spike away from the next reader.
    """

    def __init__(self, take: Callable[[], int], clock: Callable[[], float] = time.monotonic):
        self._take = take
        self._clock = clock
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every slot (a forked child starts from its own stacks)."""
        self._lock = threading.Lock()
        self._slots = {}
        self._take()

    def read(self) -> int:
        depth = self._take()
        slot = int(self._clock() // DEPTH_SLOT_S)
        oldest = slot - int(DEPTH_WINDOW_S // DEPTH_SLOT_S) + 1
        with self._lock:
            if depth > self._slots.get(slot, 0):
                self._slots[slot] = depth
            for old in [s for s in self._slots if s < oldest]:
                del self._slots[old]
            return max(self._slots.values(), default=0)


class DurationFeed:
    """Moves lifetimes from the ledger's buffer into the histogram, within a CPU budget."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._lock = threading.RLock()
        self.histogram: Histogram | None = None
        self._attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._taken: dict[tuple[str, str], int] = {}
        self._pops_before: dict[tuple[str, str], int] = {}
        self._lost: dict[tuple[str, str], int] = {}
        self.over_budget = 0
        self._tokens = FEED_BURST_S
        self._refilled = time.perf_counter()
        self._base_pops: dict[tuple[str, str], int] = {}

    # -- bookkeeping around fork ------------------------------------------

    def rebase(self, pops: Mapping[tuple[str, str], int]) -> None:
        """Forget the parent's lifetimes: a forked child starts from zero."""
        # The drain thread may have held the lock when the parent forked.
        self._lock = threading.RLock()
        with self._lock:
            for _ in self._host.drain_durations():
                pass
            self._attrs.clear()
            self._taken.clear()
            self._pops_before.clear()
            self._lost.clear()
            self.over_budget = 0
            self._base_pops = dict(pops)

    @property
    def dropped(self) -> int:
        return self.over_budget + sum(self._lost.values())

    # -- draining ---------------------------------------------------------

    def _attributes(self, key: tuple[str, str]) -> dict[str, str]:
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs[key] = {
                "kind": key[0], "app": key[1], "worker": self._host.worker,
            }
        return attrs

    def drain(self, *, budget: bool = True) -> int:
        """Take every lifetime waiting; record those the budget allows, count the rest.

        ``budget=False`` records them all (the last drain before the process goes).
        Returns how many were recorded.
        """
        with self._lock:
            histogram = self.histogram
            now = time.perf_counter()
            self._tokens = min(
                FEED_BURST_S, self._tokens + (now - self._refilled) * FEED_CPU_SHARE
            )
            self._refilled = now
            deadline = now + self._tokens if budget else float("inf")
            recorded = over = run = 0
            open_ = histogram is not None
            taken = self._taken
            # Lifetimes come grouped by (kind, app): count each group once.
            key: tuple[str, str] | None = None
            attrs: dict[str, str] = {}
            for kind, app, value in itertools.islice(
                self._host.drain_durations(), MAX_TAKE
            ):
                if key is None or kind is not key[0] or app is not key[1]:
                    if key is not None:
                        taken[key] = taken.get(key, 0) + run
                    key, run = (kind, app), 0
                    attrs = self._attributes(key)
                run += 1
                if open_ and histogram is not None:
                    histogram.record(value, attrs)
                    recorded += 1
                    # Reading the clock every 32 records keeps its cost out of the budget.
                    if not recorded & 31 and time.perf_counter() > deadline:
                        open_ = False
                elif histogram is not None:
                    over += 1
            if key is not None:
                taken[key] = taken.get(key, 0) + run
            self.over_budget += over
            if budget:
                self._tokens -= time.perf_counter() - now
            return recorded

    def account(self, pops: Mapping[tuple[str, str], int]) -> None:
        """Count what the ledger's buffer dropped, once per drain tick.

        Every pop counted at the previous tick (a second ago) has put its
        lifetime in the ledger's buffer by now, and every drain empties that
        buffer: whatever of them was never taken was dropped there. A lower
        bound while traffic flows, exact once it pauses for a tick.
        """
        with self._lock:
            for key, before in self._pops_before.items():
                lost = before - self._taken.get(key, 0)
                if lost > self._lost.get(key, 0):
                    self._lost[key] = lost
            self._pops_before = {
                key: count - self._base_pops.get(key, 0) for key, count in pops.items()
            }


class MetricsEmitter:
    """Counts anomalies and accesses; owns the instruments, the drain and the meter."""

    name: Final = "metrics"

    def __init__(self, host: Host, dropped_spans: Callable[[], int] = lambda: 0) -> None:
        self._host = host
        self._dropped_spans = dropped_spans
        self.anomalies = ExactCounts()
        self.accesses = ExactCounts()
        self._apps: set[str] = set()
        self.feed = DurationFeed(host)
        self.private: PrivateMetrics | None = None
        self.meter_provider: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_push = 0.0
        self._base: dict[str, Any] = {"pushes": {}, "errors": {}, "context": 0, "log": 0}
        self._binding: Binding | None = None
        self._inherited: Inherited[PrivateMetrics] = Inherited(
            lambda old: old.abandon_inherited(), self._choose_meter,
            lambda exc: self._host.errors.record(self.name, exc),
        )
        self.depth = DepthWindow(host.take_depth_max)

    # -- events (any thread; must be cheap) ---------------------------------

    def handle(self, event: Event) -> None:
        if isinstance(event, Anomaly):
            info = event.context
            self.anomalies.add((event.name, info.kind, self._app(info.app)))
        elif isinstance(event, OutOfContextAccess) and not event.summary:
            # A summary's accesses are in ``Host.repeated_accesses`` already.
            self.accesses.add((event.proxy, event.phase, event.outcome))

    def _app(self, app: str) -> str:
        if app in self._apps:
            return app
        if len(self._apps) >= _MAX_APPS:
            return _OTHER
        self._apps.add(app)
        return app

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        try:
            self._choose_meter()
        except Exception as exc:
            self._host.errors.record(self.name, exc)
        self._start_thread()

    def _choose_meter(self) -> None:
        """The global MeterProvider if there is one, else a private one (or none)."""
        provider = providers.global_meter_provider()
        if provider is None:
            host = self._host
            self.private = providers.build_metrics(
                host.worker, host.config, providers.environ(), host.errors.record
            )
            provider = self.private.provider if self.private is not None else None
        self._use(provider)
        if self.private is not None:
            self.private.announce(self._host.config)

    def _use(self, provider: Any) -> None:
        if self._binding is not None:
            self._binding.release(self)
            self._binding = None
        self.meter_provider = provider
        if provider is None:
            self.feed.histogram = None
            return
        meter: Meter = provider.get_meter(providers.SCOPE, VERSION)
        self._binding = bind(meter, self)
        self.feed.histogram = self._binding.histogram
        if self.private is not None and self.private.push_readers:
            self._next_push = time.monotonic() + self.private.interval_s

    def _start_thread(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctxtrace-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL_S):
            self.tick()

    def tick(self) -> None:
        """One round of the drain thread (tests call it directly)."""
        try:
            if self._inherited.held is not None:
                self._inherited.replace()
            pops = self._pops()
            self.feed.drain()
            self.feed.account(pops)
            private = self.private
            if private is not None and private.push_readers and time.monotonic() >= self._next_push:
                self._next_push = time.monotonic() + private.interval_s
                private.push()
            if private is not None and private.host_scrape is not None:
                private.host_scrape.tick()
            if private is not None or self.meter_provider is None:
                self._adopt_late_global()
        except Exception as exc:
            self._host.errors.record(self.name, exc)

    def _adopt_late_global(self) -> None:
        """An app that configures OpenTelemetry after ctxtrace started gets our metrics too."""
        provider = providers.global_meter_provider()
        if provider is None:
            return
        private, self.private = self.private, None
        self._use(provider)
        if private is not None:
            private.shutdown(2.0)

    def _pops(self) -> dict[tuple[str, str], int]:
        return {(s.kind, s.app): s.pops for s in self._host.snapshot()}

    def stop(self, timeout_s: float) -> None:
        """Record what waits and hand the last numbers over, then let go of the meter.

        The instruments stay bound until after the final export: a reader that
        collects at shutdown still sees every count. A forked child that ends before
        its drain thread built its provider (a gunicorn worker retired within a
        second) builds it now, so that its counts are exported.
        """
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, min(timeout_s, DRAIN_INTERVAL_S * 2)))
        if self._inherited.held is not None:
            self._inherited.replace()
        private, self.private = self.private, None
        try:
            self.feed.drain(budget=False)
            remaining = max(0.001, deadline - time.monotonic())
            if private is not None:
                private.shutdown(remaining)
            else:
                self._flush_global(remaining)
        finally:
            if self._binding is not None:
                self._binding.release(self)
                self._binding = None
            self.feed.histogram = None
            self.meter_provider = None

    def flush(self, timeout_s: float) -> None:
        """Record everything waiting and push it (a process about to end without atexit).

        A forked child whose drain thread has not built its provider yet (an RQ
        work-horse done within a second) builds it here, or its counts would go
        with it.
        """
        if self._inherited.held is not None:
            self._inherited.replace()
        self.feed.drain(budget=False)
        if self.private is not None:
            self.private.flush(timeout_s)
        else:
            self._flush_global(timeout_s)

    def _flush_global(self, timeout_s: float) -> None:
        """The application's provider's flush, waited for ``timeout_s`` at most."""
        provider = self.meter_provider
        if provider is not None and hasattr(provider, "force_flush"):
            millis = max(timeout_s, 0.001) * 1000
            run_within(
                timeout_s, lambda: provider.force_flush(timeout_millis=millis), self.name,
                self._host.errors.record,
            )

    def renamed(self) -> None:
        """The worker's label changed: its series, its target file and its spool file say so."""
        private = self.private
        if private is None:
            return
        if private.endpoint is None and private.host_scrape is None:
            # Pushed only (OTLP, console): the Resource it was built with names the
            # worker, so a provider of the new name replaces it, the old one dropped
            # unexported. Renames come as a process starts (gunicorn's master, as
            # it loads its arbiter), and the new provider reads the same counts.
            self._use(None)
            self.private = None
            self._inherited.renew(private)
            return
        worker = self._host.worker
        if private.labelled is not None:
            private.labelled.worker = worker
        if private.endpoint is not None:
            private.endpoint.rename(worker)
        if private.host_scrape is not None:
            private.host_scrape.rename(worker)

    def after_fork(self) -> None:
        """A forked child: its own identity, counts from zero, its own endpoint and thread."""
        global _bindings_lock
        _bindings_lock = threading.Lock()  # may have been held by another thread at fork
        snapshot = self._host.snapshot()
        self._base = {
            "pushes": {(s.kind, s.app): s.pushes for s in snapshot},
            "errors": self._host.errors.counts(),
            **self._host.dropped(),
        }
        self.depth.reset()
        self.anomalies = ExactCounts()
        self.accesses = ExactCounts()
        self.feed.rebase({(s.kind, s.app): s.pops for s in snapshot})
        inherited, self.private = self.private, None
        if inherited is not None:
            # Only what takes no lock here: this runs inside os.fork(), before
            # the fork hooks of modules imported after ctxtrace (the SDK's
            # resource detection takes concurrent.futures' lock, which only its
            # own hook releases). The drain thread builds the new provider.
            if inherited.endpoint is not None:
                inherited.endpoint.abandon()
            self._use(None)
            self._inherited.hold(inherited)
        # With the application's provider, the instruments stay: they read the
        # worker label afresh at each collection.
        self._start_thread()

    # -- reading, at collection ---------------------------------------------

    def observe_contexts(self, options: CallbackOptions) -> Iterable[Observation]:
        """``ctxtrace_contexts_total``; the first callback, so it drains the histogram first:
        what a reader exports accounts for every lifetime finished before it collected
        (recorded, or counted as dropped)."""
        try:
            self.feed.drain()
        except Exception as exc:
            self._host.errors.record(self.name, exc)
        worker = self._host.worker
        base = self._base["pushes"]
        return [
            Observation(
                s.pushes - base.get((s.kind, s.app), 0),
                {"kind": s.kind, "app": s.app, "worker": worker},
            )
            for s in self._host.snapshot()
        ]

    def observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        worker = self._host.worker
        return [
            Observation(s.active, {"kind": s.kind, "app": s.app, "worker": worker})
            for s in self._host.snapshot()
        ]

    def observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.depth.read(), {"worker": self._host.worker})]

    def observe_anomalies(self, options: CallbackOptions) -> Iterable[Observation]:
        zeros = ((name, s.kind, s.app) for s in self._host.snapshot() for name in ANOMALIES)
        return self._zero_filled(zeros, self.anomalies.items(), ("anomaly", "kind", "app"))

    def observe_accesses(self, options: CallbackOptions) -> Iterable[Observation]:
        zeros = ((p, ph, o) for p in PROXIES for ph in PHASES for o in OUTCOMES)
        counts = self.accesses.items()
        # Repeats at a site already reported in its window never became events.
        repeats = self._host.repeated_accesses()
        return self._zero_filled(zeros, counts, ("proxy", "phase", "outcome"), repeats)

    def _zero_filled(
        self,
        zeros: Iterable[tuple[str, ...]],
        counts: Iterable[tuple[tuple[str, ...], int]],
        labels: tuple[str, ...],
        more: Iterable[tuple[tuple[str, ...], int]] = (),
    ) -> list[Observation]:
        """``counts`` plus ``more``, with a 0 for each key of ``zeros`` not counted yet: a
        series exists before its first increment, so a rate over it sees that increment."""
        values: dict[tuple[str, ...], int] = dict.fromkeys(zeros, 0)
        values.update(counts)
        for key, n in more:
            values[key] = values.get(key, 0) + n
        worker = self._host.worker
        return [
            Observation(n, {**dict(zip(labels, key, strict=True)), "worker": worker})
            for key, n in values.items()
        ]

    def observe_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        worker = self._host.worker
        base = self._base["errors"]
        # The core components' series exist at 0 from the start: a first error is then
        # a step a rate() and an increase() see, and a healthy worker shows 0, not nothing.
        counts = dict.fromkeys(CORE_COMPONENTS, 0)
        counts.update(self._host.errors.counts())
        return [
            Observation(n - base.get(component, 0), {"component": component, "worker": worker})
            for component, n in counts.items()
        ]

    def dropped(self) -> dict[str, int]:
        """What each bound turned away in this process, by ``what`` (always all four)."""
        counted = self._host.dropped()
        return {
            "context": counted["context"] - self._base["context"],
            "log": counted["log"] - self._base["log"],
            "duration": self.feed.dropped,
            "span": self._dropped_spans(),
        }

    def observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        worker = self._host.worker
        return [
            Observation(n, {"what": what, "worker": worker}) for what, n in self.dropped().items()
        ]


class Binding:
    """The instruments made on one meter, and the emitter they read from now.

    A meter registers an instrument name once: a second ``instrument()`` in the
    same process (or a test run) gets the same instruments back, so their
    callbacks go through this binding to whichever emitter is running.
    """

    def __init__(self, meter: Meter) -> None:
        self.source: MetricsEmitter | None = None
        self.histogram = create_instruments(meter, self)

    def release(self, source: MetricsEmitter) -> None:
        if self.source is source:
            self.source = None

    def callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            source = self.source
            if source is None:
                return ()
            observe: Callable[[CallbackOptions], Iterable[Observation]] = getattr(source, name)
            return observe(options)

        return callback


_bindings: weakref.WeakKeyDictionary[Any, Binding] = weakref.WeakKeyDictionary()
_bindings_lock = threading.Lock()


def bind(meter: Meter, source: MetricsEmitter) -> Binding:
    """The binding for ``meter`` (made on first use), now reading from ``source``."""
    with _bindings_lock:
        binding = _bindings.get(meter)
        if binding is None:
            binding = _bindings[meter] = Binding(meter)
        binding.source = source
    return binding


def create_instruments(meter: Meter, binding: Binding) -> Histogram:
    """Every ctxtrace instrument on ``meter``; returns the duration histogram.

    Names as Prometheus shows them: a counter ``a.b`` becomes ``a_b_total``,
    unit ``s`` adds ``_seconds``, curly-brace units add nothing.
    """
    read = binding.callback
    # Registered first: its callback drains the duration buffer before any
    # reader's storage is collected.
    meter.create_observable_counter(
        "ctxtrace.contexts", [read("observe_contexts")], unit="{context}",
        description="Flask contexts pushed.",
    )
    histogram = meter.create_histogram(
        "ctxtrace.context.duration", unit="s",
        description="Lifetime of Flask contexts, push to last pop.",
        explicit_bucket_boundaries_advisory=list(BUCKETS),
    )
    for create, name, observe, unit, description in (
        (meter.create_observable_up_down_counter, "ctxtrace.contexts.active", "observe_active",
         "{context}", "Flask contexts pushed and not yet popped."),
        (meter.create_observable_gauge, "ctxtrace.context.depth_max", "observe_depth",
         "{context}", "Deepest context stack in the last minute."),
        (meter.create_observable_counter, "ctxtrace.anomalies", "observe_anomalies",
         "{anomaly}", "Context anomalies, except out-of-context access."),
        (meter.create_observable_counter, "ctxtrace.out_of_context_access", "observe_accesses",
         "{access}", "Flask proxies used outside any context."),
        (meter.create_observable_counter, "ctxtrace.internal_errors", "observe_errors",
         "{error}", "Errors inside ctxtrace, caught and swallowed."),
        (meter.create_observable_counter, "ctxtrace.dropped", "observe_dropped",
         "{record}", "Records a bound turned away."),
    ):
        create(name, [read(observe)], unit=unit, description=description)
    return histogram
