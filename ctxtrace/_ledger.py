"""The ledger of live contexts: plain bookkeeping that decides what is an anomaly.

The hook layer tells the ledger what Flask did (a push, a pop with Flask's own
push count before and after it, a unit of work starting or ending); the ledger
keeps a mirror of Flask's context stacks and turns every way they go wrong into
an event. It knows nothing of OpenTelemetry or logging and does no I/O, so it
can be driven directly by property-based tests.

The mirror stacks live in ContextVars, like Flask's own, so a push in one thread
or asyncio task and a pop in another are seen the way Flask sees them. Nodes are
immutable ``(entry, below, depth)`` tuples because a copied Context shares them.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ._events import (
    Anomaly,
    AnomalyName,
    ContextInfo,
    ContextPopped,
    ContextPushed,
    Event,
    FlightRecord,
    Kind,
    OutOfContextAccess,
    Phase,
    Site,
    Unit,
)

_Node = tuple["_Entry", "_Node | None", int]
_MAX_APPS: Final = 64
OTHER_APP: Final = "other"


def _count_of(counter: itertools.count[int]) -> int:
    """Read an ``itertools.count`` without advancing it.

    ``next()`` on a count is atomic under the GIL, which makes it an exact,
    lock-free counter for the push path; its repr is the only way to read it.
    """
    return int(repr(counter)[6:-1])


class _Stats:
    """Exact counts for one (kind, app) pair, read by the metrics emitter."""

    __slots__ = ("app", "durations", "kind", "pops", "pushes")

    def __init__(self, kind: Kind, app: str, buffer: int) -> None:
        self.kind: Kind = kind
        self.app = app
        self.pushes = itertools.count()
        self.pops = itertools.count()
        # Lifetimes wait here for the metrics emitter; a full buffer drops the
        # oldest, and the emitter counts what it never saw.
        self.durations: deque[float] = deque(maxlen=buffer)


class _ThreadState:
    """Per-thread facts captured once: identity and the flight record."""

    __slots__ = ("flight", "ident", "name", "thread")

    def __init__(self, flight: int) -> None:
        current = threading.current_thread()
        self.ident = current.ident or 0
        self.name = current.name
        self.thread: weakref.ref[threading.Thread] = weakref.ref(current)
        self.flight: deque[tuple[str, _Entry]] | None = deque(maxlen=flight) if flight else None

    def alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()


class _UnitState:
    """A unit of work while it runs; ``finished`` turns its leftovers stale."""

    __slots__ = ("checked", "dispatch", "finished", "id", "kind", "name", "parent")

    def __init__(self, uid: int, kind: str, name: str, parent: _UnitState | None) -> None:
        self.id = uid
        self.kind = kind
        self.name = name
        self.parent = parent
        self.finished = False
        self.checked = False
        # For a request: the context Flask pushed to dispatch it, once pushed.
        self.dispatch: object = None

    def info(self) -> Unit:
        return Unit(id=self.id, kind=self.kind, name=self.name)


# One tracked context object, however often it is pushed. A list, not a class:
# building it is the single most frequent thing ctxtrace does, and a list
# display costs a sixth of an ``__init__`` call. The indices are named here.
_Entry: TypeAlias = list[Any]
ID, REF, STATS, SITE, THREAD, PUSHED, UNIT, DEPTH, COUNT, FLAGS, OWNER, CARRY = range(12)

# FLAGS bits.
STREAMING = 1  # kept pushed by a streaming response, on purpose
REPORTED = 2  # a stack anomaly named it: what follows from it is not reported again
LONG_REPORTED = 4  # long_lived reported once
ORPHANED = 8  # Flask dropped it from the stack when a context below it was popped


def _info(entry: _Entry) -> ContextInfo:
    stats: _Stats = entry[STATS]
    thread: _ThreadState = entry[THREAD]
    unit: _UnitState | None = entry[UNIT]
    return ContextInfo(
        id=entry[ID],
        kind=stats.kind,
        app=stats.app,
        site=entry[SITE],
        thread_id=thread.ident,
        thread_name=thread.name,
        pushed_ns=entry[PUSHED],
        depth=entry[DEPTH],
        push_count=entry[COUNT],
        unit=unit.info() if unit is not None else None,
        streaming=bool(entry[FLAGS] & STREAMING),
    )


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Counts for one (kind, app) pair at a collection."""

    kind: Kind
    app: str
    pushes: int
    pops: int
    active: int


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    """What the ledger looks for; built from the configuration."""

    cap: int = 10_000
    flight: int = 8
    long_lived_request_s: float | None = 30.0
    long_lived_app_s: float | None = None
    long_lived_streaming: bool = False
    detect: frozenset[str] = frozenset(
        (
            "leaked",
            "long_lived",
            "wrong_pop",
            "double_pop",
            "foreign_pop",
            "stale_context",
            "out_of_context_access",
        )
    )
    duration_buffer: int = 65_536


class Ledger:
    """Live contexts of one process, per thread and Context, and their anomalies.

    ``emit`` receives every event; ``lifecycle`` asks for push/pop events too
    (off on the fast path); ``capture`` is called at each push and its result
    rides along in events (the telemetry layer keeps the OpenTelemetry context
    there, so a late span can still have the right parent).
    """

    def __init__(
        self,
        emit: Callable[[Event], None],
        policy: LedgerPolicy = LedgerPolicy(),
        *,
        slots: Iterable[str] = ("app", "request"),
        repush_stacks: bool = True,
        lifecycle: bool = False,
        capture: Callable[[], object] | None = None,
        describe: Callable[[object], tuple[Kind, str]] = lambda ctx: ("app", ""),
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._emit = emit
        self._describe = describe
        self.policy = policy
        self._repush_stacks = repush_stacks
        self._lifecycle = lifecycle
        self._capture = capture
        self._clock = clock
        self._stacks: dict[str, ContextVar[_Node | None]] = {
            slot: ContextVar(f"ctxtrace.stack.{slot}", default=None) for slot in slots
        }
        self._unit: ContextVar[_UnitState | None] = ContextVar("ctxtrace.unit", default=None)
        self._tls = threading.local()
        self._live: dict[int, _Entry] = {}
        self._stats: dict[tuple[str, str], _Stats] = {}
        self._stats_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._unit_ids = itertools.count(1)
        self.dropped_contexts = itertools.count()
        self.depth_max = 0
        self._detect = policy.detect
        self._check_stale = "stale_context" in policy.detect
        self._cap = policy.cap

    # -- per-thread facts -------------------------------------------------

    def _thread(self) -> _ThreadState:
        try:
            state: _ThreadState = self._tls.state
        except AttributeError:
            state = self._tls.state = _ThreadState(self.policy.flight)
        return state

    def stats_for(self, kind: Kind, app: str) -> _Stats:
        """The counters for a (kind, app) pair; callers cache the handle.

        App names are bounded: past ``_MAX_APPS`` distinct names, new ones count
        as ``other`` so a process making apps in a loop cannot grow the labels.
        """
        with self._stats_lock:
            stats = self._stats.get((kind, app))
            if stats is None:
                if len({a for _, a in self._stats} | {app}) > _MAX_APPS:
                    app = OTHER_APP
                stats = self._stats.get((kind, app))
                if stats is None:
                    stats = self._stats[(kind, app)] = _Stats(
                        kind, app, self.policy.duration_buffer
                    )
        return stats

    # -- pushes and pops --------------------------------------------------

    def push(
        self, ctx: object, stats: _Stats, slot: str, site: Site | None, streaming: bool = False
    ) -> None:
        """Flask pushed ``ctx`` (counted in ``stats``, on stack ``slot``) from ``site``.

        The hot path: one dictionary lookup, one list, one ContextVar set.
        """
        try:
            thread: _ThreadState = self._tls.state
        except AttributeError:
            thread = self._thread()
        var = self._stacks[slot]
        key = id(ctx)
        entry = self._live.get(key)
        if entry is not None:
            if entry[REF]() is ctx and entry[COUNT] > 0:
                entry[COUNT] += 1
                if streaming:
                    entry[FLAGS] |= STREAMING
                if self._repush_stacks:
                    below = var.get()
                    var.set((entry, below, 1 if below is None else below[2] + 1))
                if thread.flight is not None:
                    thread.flight.append(("push", entry))
                return
            self._retire_stale(entry)
        if len(self._live) >= self._cap:
            next(self.dropped_contexts)
            return
        next(stats.pushes)
        below = var.get()
        depth = 1 if below is None else below[2] + 1
        entry = [
            next(self._ids), weakref.ref(ctx), stats, site, thread, self._clock(),
            self._unit.get(), depth, 1, STREAMING if streaming else 0, None,
            self._capture() if self._capture is not None else None,
        ]
        self._live[key] = entry
        var.set((entry, below, depth))
        if depth > self.depth_max:  # noqa: PLR1730 - cheaper than max() on the push path
            self.depth_max = depth
        if thread.flight is not None:
            thread.flight.append(("push", entry))
        if self._lifecycle:
            self._emit(ContextPushed(_info(entry), entry[CARRY]))

    def dispatched(self, ctx: object, site: Site, implicit: object | None) -> None:
        """Flask pushed a request context while dispatching: name it and its unit.

        ``site`` is the request's endpoint. ``implicit`` is the app context the
        request context pushed for itself (Flask <= 3.1): it shares the site,
        and a wrong pop of it that follows from a wrong pop of the request is
        not reported again. The unit now knows its name, so what earlier units
        left on this thread is reported now.
        """
        entry = self._lookup(ctx)
        if entry is None:
            return
        entry[SITE] = site
        if implicit is not None:
            owned = self._lookup(implicit)
            if owned is not None:
                owned[OWNER] = entry
                owned[SITE] = site
        unit: _UnitState | None = entry[UNIT]
        if unit is not None and unit.kind == "request" and not unit.finished:
            unit.name = site.endpoint or unit.name
            if not unit.checked:
                self.check_stale(unit)

    def pop(self, ctx: object, slot: str, before: int, after: int) -> None:
        """Flask popped ``ctx``; ``before``/``after`` are its push counts around the pop."""
        key = id(ctx)
        entry = self._live.get(key)
        if entry is not None and entry[REF]() is not ctx:
            entry = None
        try:
            thread: _ThreadState = self._tls.state
        except AttributeError:
            thread = self._thread()
        if entry is None:
            if before == 0 and "double_pop" in self._detect:
                self._report_unknown_double_pop(ctx, thread)
            return
        if thread.flight is not None:
            thread.flight.append(("pop", entry))
        var = self._stacks[slot]
        top = var.get()
        if top is not None and top[0] is entry and before > 0 and not entry[FLAGS] & ORPHANED:
            if after < before:
                # Before the merge each push has a node of its own; after it, a
                # context stays on the stack until its last pop.
                if self._repush_stacks or entry[COUNT] <= 1:
                    var.set(top[1])
                entry[COUNT] -= 1
                if entry[COUNT] <= 0:
                    # The common end of a context's life, inlined.
                    del self._live[key]
                    stats: _Stats = entry[STATS]
                    next(stats.pops)
                    duration = (self._clock() - entry[PUSHED]) / 1e9
                    stats.durations.append(duration)
                    if self._lifecycle:
                        self._emit(ContextPopped(_info(entry), duration, entry[CARRY]))
            return
        self._pop_slow(entry, var, top, thread, before, after)

    def _pop_slow(
        self,
        entry: _Entry,
        var: ContextVar[_Node | None],
        top: _Node | None,
        thread: _ThreadState,
        before: int,
        after: int,
    ) -> None:
        """A pop that is not of the context on top: which mistake, and its aftermath."""
        flags = entry[FLAGS]
        if before == 0 or flags & ORPHANED:
            # The aftermath of a mistake already reported: Flask's own state and
            # the mirror disagree, so retire the record quietly.
            if not flags & REPORTED:
                self._report("double_pop", entry, thread)
            self._forget(entry)
            return
        node = top
        while node is not None and node[0] is not entry:
            node = node[1]
        if node is None or top is None:
            # Pushed in another thread or Context: Flask cannot restore that
            # stack from here, so the context stays where it was pushed.
            if not flags & REPORTED:
                entry[FLAGS] |= REPORTED
                self._report("foreign_pop", entry, thread)
            return
        culprit = top[0]
        if not self._follows_earlier_mistake(entry, culprit):
            self._report("wrong_pop", entry, thread, other=culprit)
        entry[FLAGS] |= REPORTED
        culprit[FLAGS] |= REPORTED
        if after < before:
            # Flask restored the stack to what it was before this context's
            # push: everything above it is no longer reachable.
            walk: _Node | None = top
            while walk is not None and walk[0] is not entry:
                walk[0][FLAGS] |= ORPHANED
                walk = walk[1]
            var.set(node[1])
            entry[COUNT] -= 1
            if entry[COUNT] <= 0:
                self._finish(entry)

    @staticmethod
    def _follows_earlier_mistake(entry: _Entry, culprit: _Entry) -> bool:
        return any(
            owner is not None and owner[FLAGS] & (REPORTED | ORPHANED)
            for owner in (entry[OWNER], culprit[OWNER])
        )

    def _retire_stale(self, entry: _Entry) -> None:
        """A record whose object was freed and whose id a new context reuses.

        Freed while still pushed is a leak the sweep has not seen yet: report it now.
        """
        self._forget(entry)
        if entry[REF]() is None and entry[COUNT] > 0 and not entry[FLAGS] & REPORTED:
            entry[FLAGS] |= REPORTED
            self._report("leaked", entry, None, reason="collected")

    def _lookup(self, ctx: object) -> _Entry | None:
        entry = self._live.get(id(ctx))
        if entry is not None and entry[REF]() is not ctx:
            return None
        return entry

    def _finish(self, entry: _Entry) -> None:
        self._forget(entry)
        stats: _Stats = entry[STATS]
        next(stats.pops)
        duration = (self._clock() - entry[PUSHED]) / 1e9
        stats.durations.append(duration)
        if self._lifecycle:
            self._emit(ContextPopped(_info(entry), duration, entry[CARRY]))

    def _forget(self, entry: _Entry) -> None:
        ctx = entry[REF]()
        if ctx is not None and self._live.get(id(ctx)) is entry:
            del self._live[id(ctx)]
            return
        for key, value in list(self._live.items()):
            if value is entry:
                self._live.pop(key, None)
                return

    # -- units of work ----------------------------------------------------

    def begin_unit(
        self, kind: str, name: str, *, check_stale: bool = True
    ) -> tuple[_UnitState, Token[_UnitState | None]]:
        """A unit of work starts on this thread.

        What earlier units left on the stacks is reported now, or, with
        ``check_stale=False``, once the unit knows its name (a request learns
        its endpoint when its context is pushed) and at the latest when it ends.
        """
        parent = self._unit.get()
        unit = _UnitState(next(self._unit_ids), kind, name, parent)
        token = self._unit.set(unit)
        if check_stale:
            self.check_stale(unit)
        return unit, token

    def check_stale(self, unit: _UnitState) -> None:
        """Report each context a finished unit left on this thread's stacks."""
        unit.checked = True
        if not self._check_stale:
            return
        for var in self._stacks.values():
            node = var.get()
            while node is not None:
                owner: _UnitState | None = node[0][UNIT]
                if owner is not None and owner.finished:
                    # Rare: only now pay for de-duplicating what is reported.
                    for entry in self._entries_on_stacks():
                        stale_owner: _UnitState | None = entry[UNIT]
                        if stale_owner is not None and stale_owner.finished:
                            self._report(
                                "stale_context", entry, self._thread(), unit=unit.info()
                            )
                    return
                node = node[1]

    def current_unit(self) -> _UnitState | None:
        return self._unit.get()

    def end_unit(
        self, unit: _UnitState, token: Token[_UnitState | None] | None, *, repair: bool = False
    ) -> list[object]:
        """A unit ends: what it pushed and left pushed is leaked.

        Returns the leaked context objects, newest first, when ``repair`` asks
        for them to be popped.
        """
        if not unit.checked:
            self.check_stale(unit)
        unit.finished = True
        try:
            if token is not None:
                self._unit.reset(token)
        except ValueError:
            self._unit.set(unit.parent)
        leftovers: list[_Entry] = []
        for var in self._stacks.values():
            node = var.get()
            while node is not None:
                entry = node[0]
                owner = entry[OWNER]
                if (
                    entry[UNIT] is unit
                    and not entry[FLAGS] & (STREAMING | REPORTED)
                    # Before Flask 3.1 a streamed request keeps the app context it
                    # pushed for itself until the stream closes.
                    and not (owner is not None and owner[FLAGS] & STREAMING)
                    and all(entry is not e for e in leftovers)
                ):
                    leftovers.append(entry)
                node = node[1]
        if not leftovers:
            return []
        thread = self._thread()
        to_repair: list[object] = []
        for entry in sorted(leftovers, key=lambda e: int(e[ID]), reverse=True):
            entry[FLAGS] |= REPORTED
            ctx = entry[REF]() if repair else None
            if ctx is not None:
                to_repair.append(ctx)
            self._report(
                "leaked", entry, thread, reason="unit_end", unit=unit.info(),
                repaired=ctx is not None,
            )
        return to_repair

    def _entries_on_stacks(self) -> list[_Entry]:
        """The distinct entries on this thread's stacks (usually none or two)."""
        found: list[_Entry] = []
        for var in self._stacks.values():
            node = var.get()
            while node is not None:
                entry = node[0]
                if not any(entry is f for f in found):
                    found.append(entry)
                node = node[1]
        return found

    # -- periodic and final checks ----------------------------------------

    def sweep(self) -> None:
        """Find long-lived contexts and leaks whose thread ended or object was freed.

        Runs off the request path (a watchdog thread), so it may walk every entry.
        """
        now = self._clock()
        policy = self.policy
        for entry in list(self._live.values()):
            collected = entry[REF]() is None
            if collected or not entry[THREAD].alive():
                self._forget(entry)
                if not entry[FLAGS] & REPORTED:
                    entry[FLAGS] |= REPORTED
                    self._report(
                        "leaked", entry, None, reason="collected" if collected else "thread_end"
                    )
                continue
            flags = entry[FLAGS]
            if flags & LONG_REPORTED or (flags & STREAMING and not policy.long_lived_streaming):
                continue
            kind = entry[STATS].kind
            limit = policy.long_lived_request_s if kind == "request" else policy.long_lived_app_s
            if limit is not None and now - entry[PUSHED] > limit * 1e9:
                entry[FLAGS] |= LONG_REPORTED
                self._report("long_lived", entry, None)

    def finish_all(self) -> None:
        """At process exit, whatever is still pushed has leaked."""
        for entry in list(self._live.values()):
            self._forget(entry)
            if not entry[FLAGS] & REPORTED:
                entry[FLAGS] |= REPORTED
                self._report("leaked", entry, None, reason="exit")

    def forget_all(self) -> None:
        """Drop every record (after fork: the parent's contexts are not ours)."""
        self._live.clear()
        for var in self._stacks.values():
            var.set(None)
        self._unit.set(None)
        self._tls = threading.local()

    # -- out-of-context access --------------------------------------------

    def access(
        self,
        proxy: str,
        site: Site | None,
        phase: Phase,
        exc: BaseException,
        parent_unit: Unit | None = None,
    ) -> None:
        """A proxy lookup failed with no context and the error reached the caller."""
        thread = self._thread()
        unit = self._unit.get()
        self._emit(
            OutOfContextAccess(
                proxy=proxy,
                site=site,
                phase=phase,
                thread_name=thread.name,
                exc_type=type(exc).__name__,
                exc_message=str(exc).split("\n", 1)[0][:200],
                unit=unit.info() if unit is not None else None,
                flight=self._flight(thread),
                at_ns=self._clock(),
                parent_unit=parent_unit,
            )
        )

    # -- reporting --------------------------------------------------------

    def _report(
        self,
        name: AnomalyName,
        entry: _Entry,
        thread: _ThreadState | None,
        *,
        other: _Entry | None = None,
        unit: Unit | None = None,
        reason: str = "",
        repaired: bool = False,
    ) -> None:
        if name not in self._detect:
            return
        where: _ThreadState = thread or entry[THREAD]
        self._emit(
            Anomaly(
                name=name,
                context=_info(entry),
                flight=self._flight(where),
                at_ns=self._clock(),
                thread_name=where.name,
                other=_info(other) if other is not None else None,
                unit=unit,
                reason=reason,
                repaired=repaired,
                carry=entry[CARRY],
            )
        )

    def _report_unknown_double_pop(self, ctx: object, thread: _ThreadState) -> None:
        kind, app = self._describe(ctx)
        info = ContextInfo(
            id=0, kind=kind, app=app, site=None, thread_id=thread.ident,
            thread_name=thread.name, pushed_ns=0, depth=0, push_count=0, unit=None,
        )
        self._emit(
            Anomaly(
                name="double_pop", context=info, flight=self._flight(thread),
                at_ns=self._clock(), thread_name=thread.name,
            )
        )

    @staticmethod
    def _flight(thread: _ThreadState) -> tuple[FlightRecord, ...]:
        if thread.flight is None:
            return ()
        return tuple(
            FlightRecord(
                op="push" if op == "push" else "pop",
                kind=entry[STATS].kind,
                context_id=entry[ID],
                site=entry[SITE],
                thread_name=entry[THREAD].name,
            )
            for op, entry in list(thread.flight)
        )

    # -- reading ----------------------------------------------------------

    def snapshot(self) -> list[StatsSnapshot]:
        """Exact counts per (kind, app), for observable instruments."""
        active: dict[tuple[str, str], int] = {}
        for entry in list(self._live.values()):
            key = (entry[STATS].kind, entry[STATS].app)
            active[key] = active.get(key, 0) + 1
        return [
            StatsSnapshot(
                kind=s.kind,
                app=s.app,
                pushes=_count_of(s.pushes),
                pops=_count_of(s.pops),
                active=active.get((s.kind, s.app), 0),
            )
            for s in list(self._stats.values())
        ]

    def drain_durations(self) -> Iterator[tuple[Kind, str, float]]:
        """Hand lifetimes to the metrics emitter, oldest first, without blocking pushes."""
        for stats in list(self._stats.values()):
            buffer = stats.durations
            while True:
                try:
                    value = buffer.popleft()
                except IndexError:
                    break
                yield stats.kind, stats.app, value

    def take_depth_max(self) -> int:
        """The deepest stack since the last call (a gauge that resets on read)."""
        depth, self.depth_max = self.depth_max, 0
        return depth

    def context_id(self, ctx: object) -> int | None:
        """ctxtrace's id for a tracked context, for log correlation."""
        entry = self._lookup(ctx)
        return int(entry[ID]) if entry is not None else None

    def live_count(self) -> int:
        return len(self._live)
