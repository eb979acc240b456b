"""The ledger of live contexts: plain bookkeeping that decides what is an anomaly.

The hook layer tells the ledger what Flask did (a push, a pop with Flask's own
push count before and after it, a unit of work starting or ending); the ledger
keeps a mirror of Flask's context stacks and turns every way they go wrong into
an event. It knows nothing of OpenTelemetry or logging and does no I/O, so it
can be driven directly by property-based tests.

The contexts Flask pushes itself to dispatch a request (the request context and,
on Flask <= 3.1, the app context it pushes for itself) are the bulk of all
pushes, and nearly always healthy. Unless something asks for every context's
lifecycle, they get no record of their own: they are counted on the request's
unit (pushes, pops, one push time) and the hook layer tells a healthy pop from
Flask's own stack. The moment the stack may go wrong around them (a context
pushed above them, a pop that is not of the top, the unit ending with them
still pushed) they are *promoted*: given full records at their place in the
mirror, after which every rule below applies to them as to any other context.

The mirror stacks live in ContextVars, like Flask's own, so a push in one thread
or asyncio task and a pop in another are seen the way Flask sees them. Nodes are
immutable ``(entry, below, depth)`` tuples because a copied Context shares them.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from types import ModuleType
from typing import Final, Literal

from ctxtrace._events import (
    Anomaly,
    AnomalyName,
    ContextInfo,
    ContextPopped,
    ContextPushed,
    Event,
    FlightRecord,
    Kind,
    Outcome,
    OutOfContextAccess,
    Phase,
    RequestServed,
    Site,
    Unit,
)
from ctxtrace.core import sites
from ctxtrace.core.accesses import AccessKey, AccessWindow
from ctxtrace.core.counters import read_count
from ctxtrace.core.names import safe_name
from ctxtrace.core.records import (
    APP_SIDE,
    CARRY,
    COUNT,
    DEPTH,
    DISPATCHING,
    FINISHED,
    FLAGS,
    HANDED_OVER,
    ID,
    IMPORT_CHECKED,
    IMPORTED,
    LONG_REPORTED,
    NO_SLOT,
    ORPHANED,
    OWNER,
    P_AT,
    P_ERROR,
    P_KEY,
    P_REPEAT,
    P_TASK,
    PUSHED,
    REF,
    REPORTED,
    REQUEST_SIDE,
    SITE,
    STATS,
    STREAMING,
    THREAD,
    UNIT,
    DispatchDetail,
    Entry,
    LedgerPolicy,
    Marker,
    PendingAccess,
    Stats,
    StatsSnapshot,
    ThreadState,
    UnitSlot,
    UnitState,
    entry_info,
    is_context,
)
from ctxtrace.core.tasks import TaskEnds

_Node = tuple["Entry", "_Node | None", int]
_MAX_APPS: Final = 64
OTHER_APP: Final = "other"
#: The unit name of a request whose URL matched no rule.
UNMATCHED: Final = "<unmatched>"
DEFAULT_POLICY: Final = LedgerPolicy()
#: Most accesses a unit keeps untold; past it the oldest is told as handled.
MAX_PENDING: Final = 32
#: Most accesses outside any unit waiting for the sweep.
MAX_LOOSE: Final = 1024
#: How long an access outside any unit waits before it is told: its error has
#: been caught (or has ended its thread) by then.
LOOSE_GRACE_NS: Final = 500_000_000
#: ``sys.modules``: an access outside any unit asks it whether asyncio is loaded.
_MODULES: Final = sys.modules
#: How far ``causes`` follows an error's causes and contexts.
_MAX_CAUSES: Final = 32


def _event(
    access: PendingAccess, outcome: Outcome, counted: int, summary: bool = False
) -> OutOfContextAccess:
    """The event of a pending access, now that its outcome is known."""
    proxy, site, phase, thread_name, exc, unit, flight, at_ns, parent, carry, _, _, _ = access
    return OutOfContextAccess(
        proxy=proxy,
        site=site,
        phase=phase,
        thread_name=thread_name,
        exc_type=type(exc).__name__,
        exc_message=str(exc).split("\n", 1)[0][:200],
        unit=unit,
        flight=flight,
        at_ns=at_ns,
        parent_unit=parent,
        outcome=outcome,
        carry=carry,
        counted_since_last=counted,
        summary=summary,
    )


def _being_handled(exc: BaseException) -> bool:
    """Whether ``exc`` is being handled on this thread (an ``except`` or ``finally``
    block, or a context manager's exit, for it runs below us); a chain longer than
    ``_MAX_CAUSES`` counts as yes."""
    current = sys.exc_info()[1]
    depth = 0
    while current is not None:
        if current is exc or depth == _MAX_CAUSES:
            return True
        current = current.__context__
        depth += 1
    return False


def _loose_outcome(access: PendingAccess) -> Outcome:
    """What became of an access outside any unit: by how its asyncio task ended, if it
    was made in one that has, else by the frame that caught its error."""
    error = access[P_ERROR]
    end = access[P_TASK]
    if end is not None and end.ended:
        died_of = end.error
        if died_of is not None and any(e is error for e in causes(died_of)):
            return "escaped"
        return "handled"
    return "handled" if sites.caught_by_application(error) else "escaped"


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from or while handling, at most ``_MAX_CAUSES``."""
    found: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(found) < _MAX_CAUSES:
        error = todo.pop()
        if any(error is seen for seen in found):
            continue
        found.append(error)
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return found


class Ledger:
    """Live contexts of one process, per thread and Context, and their anomalies.

    ``emit`` receives every event; ``lifecycle`` asks for push/pop events too
    (off on the fast path; it also gives the contexts Flask pushes to dispatch
    a request full records from their push, unless ``requests`` asks for one
    ``RequestServed`` per request instead, which keeps them on the fast path);
    ``capture`` is called at each
    tracked push and its result rides along in events (the telemetry layer
    keeps the OpenTelemetry context there, so a late span can still have the
    right parent). For a request's own context that gets its record after its
    push, ``capture`` is called with that context as its one argument.
    """

    def __init__(
        self,
        emit: Callable[[Event], None],
        policy: LedgerPolicy = DEFAULT_POLICY,
        *,
        slots: Iterable[str] = ("app", "request"),
        repush_stacks: bool = True,
        lifecycle: bool = False,
        requests: bool = False,
        capture: Callable[..., object] | None = None,
        describe: Callable[[object], tuple[Kind, str]] = lambda ctx: ("app", ""),
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._emit = emit
        self._describe = describe
        self.policy = policy
        self._repush_stacks = repush_stacks
        self._lifecycle = lifecycle
        self._requests = requests
        self._track_dispatch = lifecycle and not requests
        self._capture = capture
        self._clock = clock
        self._stacks: dict[str, ContextVar[_Node | None]] = {
            slot: ContextVar(f"ctxtrace.stack.{slot}", default=None) for slot in slots
        }
        # Where a request context sits: its own stack before the merge, the app stack after.
        self.request_slot = "request" if "request" in self._stacks else "app"
        self._request_var = self._stacks[self.request_slot]
        self._app_var = self._stacks.get("app", self._request_var)
        self._slot: ContextVar[UnitSlot] = ContextVar("ctxtrace.unit", default=NO_SLOT)
        #: This thread's ``UnitSlot`` as this Context sees it (``.unit`` is the running
        #: unit): the ContextVar's own ``get``, as every push asks and a method
        #: around it would cost a Python call.
        self.current_slot: Callable[[], UnitSlot] = self._slot.get
        self.begin_request = self._build_begin_request()
        self._tls = threading.local()
        #: Called once by the first thread that needs per-thread state, if set
        #: (the agent's restart in a forked child; see ``_agent.Agent.after_fork``).
        self.first_use: Callable[[], None] | None = None
        self._live: dict[int, Entry] = {}
        #: Which contexts have records, by ``id()``; read-only for the hook layer: a
        #: healthy pop of anything else (bar a request's own) needs nothing from here.
        self.records: Mapping[int, Entry] = self._live
        # Request units whose own contexts are pushed and untracked (see the module doc).
        self._inflight: set[UnitState] = set()
        # Accesses made outside any unit of work that wait for the sweep: their error
        # was still being handled at their thread's next access, or too many threads
        # held one (see ``access``).
        self._loose: deque[PendingAccess] = deque()
        # Per thread, its newest access outside any unit (see ``access``).
        self._held: dict[ThreadState, PendingAccess] = {}
        self._task_ends = TaskEnds()
        self._loose_lock = threading.Lock()
        self._stats: dict[tuple[str, str], Stats] = {}
        self._stats_lock = threading.Lock()
        self._endpoint_sites: dict[str, Site] = {}
        self._ids = itertools.count(1)
        self._accesses: AccessWindow[PendingAccess] = AccessWindow(policy.access_window_s)
        self.dropped_contexts = itertools.count()
        self.depth_max = 0
        self._detect = policy.detect
        self._check_stale = "stale_context" in policy.detect
        self._cap = policy.cap
        self.push: Callable[
            [object, Stats, str, Site | None, bool, UnitState | None], None
        ] = self._build_push()
        self.popped: Callable[[object, str, Entry], None] = self._build_popped()
        self.dispatch_pushed = self._build_dispatch_pushed()
        self.end_request = self._build_end_request()

    # -- per-thread facts -------------------------------------------------

    def _thread(self) -> ThreadState:
        try:
            state: ThreadState = self._tls.state
        except AttributeError:
            first_use = self.first_use
            if first_use is not None:
                # A forked child's first push: what waited for gevent's patch
                # (which never came) is done now, per-thread state included.
                first_use()
            state = self._tls.state = ThreadState(self.policy.flight)
        return state

    def stats_for(self, kind: Kind, app: str) -> Stats:
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
                    stats = self._stats[(kind, app)] = Stats(
                        kind, app, self.policy.duration_buffer
                    )
        return stats

    @property
    def tracks_dispatch(self) -> bool:
        """Whether a request's own contexts get full records from their push."""
        return self._track_dispatch

    # -- pushes and pops of tracked contexts --------------------------------

    def _build_push(self) -> Callable[..., None]:
        """``push(ctx, stats, slot, site, streaming, unit)``: Flask pushed ``ctx``.

        ``ctx`` is counted in ``stats``, sits on stack ``slot`` and was pushed
        from ``site``; ``unit`` is the current unit of work. Pushed above a
        request's own untracked contexts, ``ctx`` first gives those their
        records, so the mirror holds the whole stack before anything can go
        wrong on it.

        Every user push runs this, so it is a closure over what it reads (a
        free variable costs one instruction, ``self.x`` two) and the uncommon
        cases (a context pushed again, the cap reached) leave it at once.
        """
        ledger = self
        live = self._live
        stacks = self._stacks
        ids = self._ids
        clock = self._clock
        capture = self._capture
        cap = self._cap
        lifecycle = self._lifecycle
        promote_all = self._promote_all
        ref = weakref.ref

        def push(
            ctx: object,
            stats: Stats,
            slot: str,
            site: Site | None,
            streaming: bool,
            unit: UnitState | None,
        ) -> None:
            if unit is not None:
                unit.tracked = True
                state = unit.dispatch
                # ``dispatch_live``, inlined.
                if unit.parent is not None or (
                    state is not None and state.__class__ is not Marker
                ):
                    promote_all(unit)
            key = id(ctx)
            if key in live or len(live) >= cap:
                ledger._push_uncommon(ctx, stats, slot, site, streaming, unit)
                return
            try:
                thread: ThreadState = ledger._tls.state
            except AttributeError:
                thread = ledger._thread()
            var = stacks[slot]
            below = var.get()
            depth = 1 if below is None else below[2] + 1
            entry = [
                next(ids), ref(ctx), stats, site, thread, clock(), unit, depth, 1,
                STREAMING if streaming else 0, None,
                capture() if capture is not None else None,
            ]
            live[key] = entry
            var.set((entry, below, depth))
            next(stats.pushes)
            if depth > ledger.depth_max:  # noqa: PLR1730 - cheaper than max() here
                ledger.depth_max = depth
            if thread.flight is not None:
                thread.flight.append(("push", entry))
            if lifecycle:
                ledger._emit(ContextPushed(entry_info(entry), entry[CARRY]))

        return push

    def _push_uncommon(
        self,
        ctx: object,
        stats: Stats,
        slot: str,
        site: Site | None,
        streaming: bool,
        unit: UnitState | None,
    ) -> None:
        """A push of a context that has a record already, or one past the cap."""
        entry = self._live.get(id(ctx))
        if entry is not None:
            if entry[REF]() is ctx and entry[COUNT] > 0:
                thread = self._thread()
                entry[COUNT] += 1
                if streaming:
                    entry[FLAGS] |= STREAMING
                if self._repush_stacks:
                    var = self._stacks[slot]
                    below = var.get()
                    var.set((entry, below, 1 if below is None else below[2] + 1))
                if thread.flight is not None:
                    thread.flight.append(("push", entry))
                return
            # A record whose object was freed and whose id ``ctx`` reuses.
            self._retire_stale(entry)
            if len(self._live) < self._cap:
                self.push(ctx, stats, slot, site, streaming, unit)
                return
        next(self.dropped_contexts)

    def _build_popped(self) -> Callable[[object, str, Entry], None]:
        """``popped(ctx, slot, entry)``: Flask popped ``ctx`` from the top of its stack.

        The healthy pop. ``entry`` is ``ctx``'s record as the hook layer found
        it in ``records``. The hook layer checks Flask's own stack before the
        pop, so nothing here needs Flask's push counts: a pop of the context on
        top always takes effect. A closure for the reason ``push`` is one.
        """
        ledger = self
        live = self._live
        stacks = self._stacks
        clock = self._clock
        repush_stacks = self._repush_stacks
        lifecycle = self._lifecycle

        def popped(ctx: object, slot: str, entry: Entry) -> None:
            if entry[REF]() is not ctx:
                return
            # Popped from the top of its own stack: in its own Context, so (bar a
            # Context copied into another thread) on the thread that pushed it.
            thread: ThreadState = entry[THREAD]
            if thread.flight is not None:
                thread.flight.append(("pop", entry))
            var = stacks[slot]
            top = var.get()
            count = entry[COUNT]
            if top is None or top[0] is not entry or entry[FLAGS] & ORPHANED:
                # The mirror disagrees with Flask (the aftermath of an earlier mistake).
                ledger._pop_slow(entry, var, top, thread, count, count - 1)
                return
            # Before the merge each push has a node of its own; after it, a context
            # stays on the stack until its last pop.
            if repush_stacks or count <= 1:
                var.set(top[1])
            entry[COUNT] = count - 1
            if count <= 1:
                # The common end of a context's life: ``_finish``, inlined.
                del live[id(ctx)]
                stats: Stats = entry[STATS]
                next(stats.pops)
                duration = (clock() - entry[PUSHED]) / 1e9
                stats.durations.append(duration)
                if lifecycle:
                    ledger._emit(ContextPopped(entry_info(entry), duration, entry[CARRY]))

        return popped

    def pop(self, ctx: object, slot: str, before: int, after: int) -> None:
        """Flask popped ``ctx``, which was not on top of its stack (or Flask refused).

        ``before``/``after`` are Flask's push counts around the pop. The hook
        layer calls ``promote_current`` before such a pop, so the mirror holds
        every context of this Context's stack.
        """
        key = id(ctx)
        entry = self._live.get(key)
        if entry is not None and entry[REF]() is not ctx:
            entry = None
        try:
            thread: ThreadState = self._tls.state
        except AttributeError:
            thread = self._thread()
        if entry is None:
            owner = self._dispatching_unit(ctx)
            if owner is not None:
                self._foreign_dispatch_pop(owner, ctx, thread)
            elif before == 0 and "double_pop" in self._detect:
                self._report_unknown_double_pop(ctx, thread)
            return
        if thread.flight is not None:
            thread.flight.append(("pop", entry))
        var = self._stacks[slot]
        top = var.get()
        if top is not None and top[0] is entry and before > 0 and not entry[FLAGS] & ORPHANED:
            if after < before:
                if self._repush_stacks or entry[COUNT] <= 1:
                    var.set(top[1])
                entry[COUNT] -= 1
                if entry[COUNT] <= 0:
                    self._finish(entry)
            return
        self._pop_slow(entry, var, top, thread, before, after)

    def _pop_slow(
        self,
        entry: Entry,
        var: ContextVar[_Node | None],
        top: _Node | None,
        thread: ThreadState,
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
            self._report_once("foreign_pop", entry, thread)
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
    def _follows_earlier_mistake(entry: Entry, culprit: Entry) -> bool:
        return any(
            owner is not None and owner[FLAGS] & (REPORTED | ORPHANED)
            for owner in (entry[OWNER], culprit[OWNER])
        )

    def _retire_stale(self, entry: Entry) -> None:
        """A record whose object was freed and whose id a new context reuses.

        Freed while still pushed is a leak the sweep has not seen yet: report it now.
        """
        self._forget(entry)
        if entry[REF]() is None and entry[COUNT] > 0:
            self._report_once("leaked", entry, None, reason="collected")

    def _lookup(self, ctx: object) -> Entry | None:
        entry = self._live.get(id(ctx))
        if entry is not None and entry[REF]() is not ctx:
            return None
        return entry

    def _finish(self, entry: Entry) -> None:
        self._forget(entry)
        stats: Stats = entry[STATS]
        next(stats.pops)
        duration = (self._clock() - entry[PUSHED]) / 1e9
        stats.durations.append(duration)
        if self._lifecycle:
            self._emit(ContextPopped(entry_info(entry), duration, entry[CARRY]))

    def _forget(self, entry: Entry) -> bool:
        """Drop ``entry`` from the live contexts; whether it was still there."""
        ctx = entry[REF]()
        if ctx is not None and self._live.get(id(ctx)) is entry:
            del self._live[id(ctx)]
            return True
        for key, value in list(self._live.items()):
            if value is entry:
                return self._live.pop(key, None) is entry
        return False

    # -- the contexts Flask pushes to dispatch a request ---------------------

    def dispatch_app_pushed(self, unit: UnitState, ctx: object, stats: Stats) -> None:
        """Lifecycle mode: Flask <= 3.1 pushed an app context for the request it dispatches.

        Otherwise the hook layer only notes it on the unit, for ``dispatch_pushed``.
        """
        self.push(ctx, stats, "app", None, False, unit)
        unit.dispatch_app = ctx

    def _build_dispatch_pushed(
        self,
    ) -> Callable[[UnitState, object, Stats, Stats | None, object], None]:
        """``dispatch_pushed(unit, ctx, stats, app_stats, endpoint)``: Flask pushed the
        request context that dispatches ``unit``, matched to ``endpoint``.

        ``app_stats`` counts the app context Flask <= 3.1 pushed for it, if it
        did. Counted, timed and put in the flight record (one record for the
        request: it tells its pushes and pops), but not tracked, unless
        lifecycle events are wanted. The unit now knows its name, so what
        earlier units left on this thread is reported now. Once per request,
        so a closure for the reason ``push`` is one, built for the mode.
        """
        ledger = self
        live = self._live
        clock = self._clock
        inflight_add = self._inflight.add
        capture = self._capture if self._requests else None
        track = self._track_dispatch

        def dispatch_pushed(
            unit: UnitState, ctx: object, stats: Stats, app_stats: Stats | None, endpoint: object
        ) -> None:
            unit.name = endpoint if endpoint.__class__ is str else UNMATCHED
            if track:
                ledger._dispatch_tracked(unit, ctx, stats)
                return
            if capture is not None:
                unit.carry = capture(ctx)
            thread = unit.slot.thread
            unit.dispatch = ctx
            unit.stats = stats
            unit.pushed_ns = clock()
            next(stats.pushes)
            if app_stats is not None:
                unit.app_stats = app_stats
                next(app_stats.pushes)
            inflight_add(unit)
            if thread.flight is not None:
                thread.flight.append(unit)
            if live:
                ledger._dispatched_over(unit)
            else:
                # Nothing tracked anywhere, so nothing below: depth 1, nothing stale.
                unit.checked = True
                if not ledger.depth_max:
                    ledger.depth_max = 1

        return dispatch_pushed

    def _dispatched_over(self, unit: UnitState) -> None:
        """A request dispatched while contexts are tracked: its depth, and what is stale."""
        below = self._request_var.get()
        below_app = self._app_var.get()
        detail = unit.detail = DispatchDetail(
            1 if below is None else below[2] + 1, 1 if below_app is None else below_app[2] + 1
        )
        deepest = max(detail.depth, detail.app_depth if unit.dispatch_app else 0)
        if deepest > self.depth_max:  # noqa: PLR1730 - reads like the push path's
            self.depth_max = deepest
        self.check_stale(unit)

    def _dispatch_tracked(self, unit: UnitState, ctx: object, stats: Stats) -> None:
        """Lifecycle mode: the request context gets its record now, named by its endpoint."""
        self.push(ctx, stats, self.request_slot, None, False, unit)
        implicit = unit.dispatch_app
        unit.dispatch = unit.dispatch_app = HANDED_OVER
        self.dispatched(ctx, self._endpoint_site(unit.name), implicit)

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
        unit: UnitState | None = entry[UNIT]
        if unit is not None and unit.kind == "request" and not unit.finished:
            unit.name = site.endpoint or unit.name
            if not unit.checked:
                self.check_stale(unit)

    def promote_current(self) -> None:
        """Give the request contexts under this Context's stack records (before a bad pop)."""
        unit = self.current_unit()
        if unit is not None and (unit.parent is not None or unit.dispatch_live()):
            self._promote_all(unit)

    def _promote_all(self, unit: UnitState | None) -> None:
        while unit is not None:
            if unit.dispatch_live():
                self._promote(unit)
            unit = unit.parent

    def _promote(self, unit: UnitState) -> None:
        """Track a request's own contexts from here on, at their place in the mirror.

        Nothing tracked was pushed above them since their push (a push would
        have promoted them first), so their place is the top of each stack.
        Their pushes were counted already; their pops will be, as any other.
        """
        request, app = self._dispatch_entries(unit)
        unit.hand_over()
        self._inflight.discard(unit)
        placed = ((app, self._app_var), (request, self._request_var))
        for entry, var in placed:
            if entry is None or entry[FLAGS] & REPORTED:
                continue
            ctx = entry[REF]()
            if ctx is None:
                continue
            below = var.get()
            entry[DEPTH] = 1 if below is None else below[2] + 1
            var.set((entry, below, entry[DEPTH]))
            self._live[id(ctx)] = entry

    def _detail(self, unit: UnitState) -> DispatchDetail:
        detail = unit.detail
        if detail is None:
            detail = unit.detail = DispatchDetail()
        return detail

    def _dispatch_entries(self, unit: UnitState) -> tuple[Entry, Entry | None]:
        """Full records for a request's own contexts, built once, on the first need."""
        detail = self._detail(unit)
        if detail.entries is not None:
            return detail.entries
        site = self._endpoint_site(unit.name)
        capture = self._capture
        request = [
            self._dispatch_id(unit, REQUEST_SIDE), weakref.ref(unit.dispatch), unit.stats,
            site, unit.slot.thread, unit.pushed_ns, unit, detail.depth, 1, 0, None,
            capture(unit.dispatch) if capture is not None else None,
        ]
        app: Entry | None = None
        implicit = unit.dispatch_app
        if is_context(implicit):
            app = [
                self._dispatch_id(unit, APP_SIDE), weakref.ref(implicit), unit.app_stats,
                site, unit.slot.thread, unit.pushed_ns, unit, detail.app_depth, 1, 0, request,
                capture() if capture is not None else None,
            ]
        detail.entries = (request, app)
        return detail.entries

    def _dispatch_id(self, unit: UnitState, side: int) -> int:
        """ctxtrace's id for one of a request's own contexts, given when first asked."""
        ids = self._detail(unit).ids
        if not ids[side]:
            ids[side] = next(self._ids)
        return ids[side]

    def _endpoint_site(self, endpoint: str) -> Site:
        site = self._endpoint_sites.get(endpoint)
        if site is None:
            # The endpoint is the app's text: cleaned once per name, kept clean.
            site = Site(file="", line=0, function="", endpoint=safe_name(endpoint))
            if len(self._endpoint_sites) < 4096:
                self._endpoint_sites[endpoint] = site
        return site

    def _dispatching_unit(self, ctx: object) -> UnitState | None:
        """The running request whose untracked context ``ctx`` is, if any."""
        unit = self.current_unit()
        if unit is not None and (unit.dispatch is ctx or unit.dispatch_app is ctx):
            return unit
        for other in list(self._inflight):
            if other.dispatch is ctx or other.dispatch_app is ctx:
                return other
        return None

    def _foreign_dispatch_pop(
        self, unit: UnitState, ctx: object, thread: ThreadState
    ) -> None:
        """A request's own context popped outside its Context: reported once, left pushed."""
        request, app = self._dispatch_entries(unit)
        entry = request if unit.dispatch is ctx else app
        if entry is None:
            return
        if thread.flight is not None:
            thread.flight.append(("pop", entry))
        self._report_once("foreign_pop", entry, thread)

    def _live_dispatch_entries(self, unit: UnitState) -> list[Entry]:
        """The records of a running request's own contexts that are still pushed."""
        request, app = self._dispatch_entries(unit)
        return [request] if app is None or not is_context(unit.dispatch_app) else [request, app]

    # -- units of work ----------------------------------------------------

    def _build_begin_request(self) -> Callable[[], UnitState]:
        """``begin_request()``: a request starts (``Flask.__call__``) on this thread.

        Its stale check waits for the dispatch, which names it after its
        endpoint. The unit becomes its thread's slot's current unit; the slot
        is made (and set in the ContextVar) once per thread and Context.
        """
        slot_get = self._slot.get
        own_slot = self._own_slot
        unit_state = UnitState

        def begin_request() -> UnitState:
            slot = slot_get()
            if slot.ident != threading.get_ident():
                slot = own_slot()
            unit = unit_state()
            unit.parent = slot.unit
            unit.slot = slot
            # The defaults read on every request, stored: CPython 3.11 reads an
            # instance's own value in a few instructions, a class default through
            # the type's lookup on every read.
            unit.kind = "request"
            unit.dispatch = unit.dispatch_app = unit.pending = None
            unit.tracked = False
            slot.unit = unit
            return unit

        return begin_request

    def _own_slot(self) -> UnitSlot:
        """This thread's slot, in this Context (first unit here, or a Context copied in)."""
        slot = UnitSlot(threading.get_ident(), self._thread())
        self._slot.set(slot)
        return slot

    def current_unit(self) -> UnitState | None:
        """The unit of work running on this thread, as this Context sees it, if any."""
        return self._slot.get().unit

    def begin_unit(self, kind: str, name: str, *, check_stale: bool = True) -> UnitState:
        """A unit of work starts on this thread.

        What earlier units left on the stacks is reported now, or, with
        ``check_stale=False``, once the unit knows its name (a request learns
        its endpoint when its context is pushed) and at the latest when it ends.
        """
        unit = self.begin_request()
        unit.kind = kind
        unit.name = safe_name(name)
        thread = self._thread()
        unit.outer_on_thread, thread.unit = thread.unit, unit
        if check_stale:
            self.check_stale(unit)
        return unit

    def check_stale(self, unit: UnitState) -> None:
        """Report each context a finished unit left on this thread's stacks."""
        unit.checked = True
        # Units around this one that put their check off (an executor work item
        # serving a request) are checked too: one report, under the inner name.
        outer = unit.parent
        while outer is not None and not outer.checked:
            outer.checked = True
            outer = outer.parent
        if not self._check_stale:
            return
        for var in self._stacks.values():
            node = var.get()
            while node is not None:
                owner: UnitState | None = node[0][UNIT]
                if owner is not None and owner.finished and not self._imported(node[0]):
                    # Rare: only now pay for de-duplicating what is reported.
                    for entry in self._entries_on_stacks():
                        stale_owner: UnitState | None = entry[UNIT]
                        if (
                            stale_owner is not None
                            and stale_owner.finished
                            and not self._imported(entry)
                        ):
                            self._report(
                                "stale_context", entry, self._thread(), unit=unit.info()
                            )
                    return
                node = node[1]

    @staticmethod
    def leave_unit(unit: UnitState) -> None:
        """Leave a unit without judging it: the agent was switched off while it ran."""
        unit.slot.unit = unit.parent

    def _build_end_request(self) -> Callable[[UnitState, bool], Sequence[object]]:
        """``end_request(unit, repair)``: a request unit begun by ``begin_request`` ends;
        returns what ``repair`` should pop (see ``end_unit``).

        The request's own contexts were popped from the top, untracked (the
        hook layer marked them, with no call into the ledger): their pops are
        counted and timed here, microseconds later. The app context Flask
        <= 3.1 pushed for the request was popped inside that pop: had it not
        been on top, its pop would have given both records. When nothing else
        happened (nothing tracked, nothing pending), that is the whole end;
        otherwise ``end_unit`` judges the rest.
        """
        clock = self._clock
        inflight_discard = self._inflight.discard
        end_unit = self.end_unit
        plain = not self._requests

        def end_request(unit: UnitState, repair: bool) -> Sequence[object]:
            if unit.dispatch is FINISHED:
                inflight_discard(unit)
                duration = (clock() - unit.pushed_ns) / 1e9
                stats = unit.stats
                next(stats.pops)
                stats.durations.append(duration)
                if unit.dispatch_app is not None:  # the context itself: see ``UnitState``
                    stats = unit.app_stats
                    next(stats.pops)
                    stats.durations.append(duration)
                if plain and unit.checked and not unit.tracked and unit.pending is None:
                    unit.finished = True
                    unit.slot.unit = unit.parent
                    return ()
            return end_unit(unit, repair)

        return end_request

    def end_unit(self, unit: UnitState, repair: bool = False) -> list[object]:
        """A unit ends: what it pushed and left pushed is leaked.

        Returns the leaked context objects, newest first, when ``repair`` asks
        for them to be popped. A request's own contexts popped from the top
        were counted by ``end_request``, which ends every request unit.
        """
        state = unit.dispatch
        if state is not None and state.__class__ is not Marker:  # ``dispatch_live``, inlined
            # The request's own context outlives it: give it a record, reported below.
            self._promote(unit)
        if self._requests and state is not None and unit.kind == "request":
            self._served(unit, state)
        if not unit.checked:
            self.check_stale(unit)
        if unit.pending is not None:
            self._settle(unit)
        unit.finished = True
        if unit.kind != "request":
            self._leave_thread(unit)
        unit.slot.unit = unit.parent
        if not unit.tracked:
            return []  # nothing of this unit's was ever on the mirror
        leftovers = self._left_by(unit)
        if not leftovers:
            return []
        return self._report_left(unit, leftovers, repair)

    def _served(self, unit: UnitState, state: object) -> None:
        """``RequestServed`` for a request whose own contexts were pushed (``requests``)."""
        if state is DISPATCHING:
            return  # Flask's push failed: nothing was pushed
        if state is FINISHED:
            still_pushed = False
        else:
            request = self._dispatch_entries(unit)[0]
            ctx = request[REF]()
            still_pushed = ctx is not None and self._live.get(id(ctx)) is request
        app_stats = getattr(unit, "app_stats", None)
        self._emit(
            RequestServed(
                unit.info(),
                unit.stats.app,
                unit.pushed_ns,
                (self._clock() - unit.pushed_ns) / 1e9,
                1 if app_stats is None else 2,
                still_pushed,
                unit.carry,
            )
        )

    def _report_left(self, unit: UnitState, leftovers: list[Entry], repair: bool) -> list[object]:
        """``leftovers``, which ``unit`` left pushed: leaked, newest first (what a module's
        body pushed at import aside); the ones to pop when ``repair`` asks."""
        thread = self._thread()
        to_repair: list[object] = []
        for entry in sorted(leftovers, key=lambda e: int(e[ID]), reverse=True):
            if self._imported(entry):
                # The module meant it to stay (its later users rely on it): said
                # once, never popped for it.
                self._report_imported(entry, thread)
                continue
            entry[FLAGS] |= REPORTED
            ctx = entry[REF]() if repair else None
            if ctx is not None:
                to_repair.append(ctx)
            self._report(
                "leaked", entry, thread, reason="unit_end", unit=unit.info(),
                repaired=ctx is not None,
            )
        return to_repair

    def _leave_thread(self, unit: UnitState) -> None:
        """The thread's innermost unit is the one this unit began in again."""
        thread = self._thread()
        if thread.unit is unit:
            thread.unit = unit.outer_on_thread

    def _left_by(self, unit: UnitState) -> list[Entry]:
        """The contexts ``unit`` pushed that are still on this thread's stacks."""
        leftovers: list[Entry] = []
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
        return leftovers

    def _entries_on_stacks(self) -> list[Entry]:
        """The distinct entries on this thread's stacks (usually none or two)."""
        found: list[Entry] = []
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
        for entry in list(self._live.values()):
            collected = entry[REF]() is None
            if collected or not entry[THREAD].alive():
                if not self._forget(entry):
                    # Popped since this walk began (the sweep runs beside the threads
                    # and greenlets it watches, and its own reports may let them run):
                    # finished, not leaked.
                    continue
                if self._imported(entry):
                    self._report_imported(entry, None)
                    continue
                self._report_once(
                    "leaked", entry, None, reason="collected" if collected else "thread_end"
                )
                continue
            self._check_age(entry, now)
        for unit in list(self._inflight):
            self._sweep_dispatch(unit, now)
        self.settle_loose(now - LOOSE_GRACE_NS)
        self._sum_up_repeats(now)

    def _check_age(self, entry: Entry, now: int) -> None:
        if self._imported(entry):
            self._report_imported(entry, None)
            return
        flags = entry[FLAGS]
        policy = self.policy
        if flags & LONG_REPORTED or (flags & STREAMING and not policy.long_lived_streaming):
            return
        kind = entry[STATS].kind
        limit = policy.long_lived_request_s if kind == "request" else policy.long_lived_app_s
        if limit is not None and now - entry[PUSHED] > limit * 1e9:
            entry[FLAGS] |= LONG_REPORTED
            self._report("long_lived", entry, None)

    def _sweep_dispatch(self, unit: UnitState, now: int) -> None:
        """The sweep for a running request's untracked contexts: age, or a dead thread."""
        if not unit.dispatch_live():
            self._inflight.discard(unit)
            return
        if not unit.slot.thread.alive():
            self._inflight.discard(unit)
            for entry in self._live_dispatch_entries(unit):
                self._report_once("leaked", entry, None, reason="thread_end")
            return
        policy = self.policy
        limits = [policy.long_lived_request_s, policy.long_lived_app_s]
        age_s = (now - unit.pushed_ns) / 1e9
        if any(limit is not None and age_s > limit for limit in limits):
            for entry in self._live_dispatch_entries(unit):
                self._check_age(entry, now)

    def finish_all(self) -> None:
        """At process exit, whatever is still pushed has leaked (bar what a module's
        body pushed at import: said once, by now or here)."""
        self.settle_all()
        for entry in list(self._live.values()):
            self._forget(entry)
            if self._imported(entry):
                self._report_imported(entry, None)
                continue
            self._report_once("leaked", entry, None, reason="exit")
        for unit in list(self._inflight):
            self._inflight.discard(unit)
            if unit.dispatch_live():
                for entry in self._live_dispatch_entries(unit):
                    self._report_once("leaked", entry, None, reason="exit")

    def forget_all(self) -> None:
        """Drop every record (after fork: the parent's contexts are not ours)."""
        self._live.clear()
        self._inflight.clear()
        # The parent tells its own accesses; a child would count them again.
        self._loose = deque()
        self._held = {}
        self._task_ends = TaskEnds()
        self._accesses = AccessWindow(self.policy.access_window_s)
        self._loose_lock = threading.Lock()
        for var in self._stacks.values():
            var.set(None)
        self._slot.set(NO_SLOT)
        self._tls = threading.local()

    def rebind_threads(self) -> None:
        """New per-thread state, of the ``threading.local`` in place now (gevent's, once
        it patched): state made before would be shared by every greenlet."""
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
        """A proxy lookup failed with no context; ``exc`` is the error the caller gets.

        Whether the application catches it is known only later, so the access
        waits: it is told as ``escaped`` when ``escaped()`` hears of its error (or
        of one it caused) failing the unit, else as ``handled`` when the unit ends.
        Only the newest errors of a unit can still fail it: past ``MAX_PENDING``
        the oldest is told as handled. An access outside any unit is told at its
        thread's next one (unless its error is still being handled then), else
        at the first sweep after ``LOOSE_GRACE_NS``; one made in an asyncio task
        waits for the sweep, where the task's end, if it has come, tells.
        """
        try:
            thread: ThreadState = self._tls.state
        except AttributeError:
            thread = self._thread()
        unit = self._slot.get().unit or thread.unit
        now = self._clock()
        # The site's file and line (strings hash once): the window's key, hashed in C.
        key: AccessKey = (proxy, site.file, site.line, phase) if site else (proxy, "", 0, phase)
        if self._accesses.is_repeat(key, now):
            # Likely only counted: what nothing but a full report needs is left out.
            flight: tuple[FlightRecord, ...] = ()
            carry = None
            repeat = True
        else:
            capture = self._capture
            flight = self._flight(thread)
            carry = capture() if capture is not None else None
            repeat = False
        access: PendingAccess = (
            proxy,
            site,
            phase,
            thread.name,
            exc,
            unit.info() if unit is not None else None,
            flight,
            now,
            parent_unit,
            carry,
            key,
            repeat,
            None,
        )
        if unit is None or unit.finished:
            # In an asyncio task? Asked inline: every access outside a unit asks.
            asyncio = _MODULES.get("asyncio")
            if asyncio is not None and asyncio._get_running_loop() is not None:
                self._wait_in_task(access, asyncio)
                return
            # The thread's previous access outside a unit has met its fate by now,
            # unless its error is still being handled: told at once, so that a hot
            # loop holds one error (with its frames), not a queue of them.
            held = self._held
            previous = held.pop(thread, None)
            if len(held) < MAX_LOOSE:
                held[thread] = access
            else:
                self._wait_loose(access)
            if previous is not None:
                error = previous[P_ERROR]
                if _being_handled(error):
                    self._wait_loose(previous)
                else:
                    # Made outside any task (see above), so its frames tell: what
                    # ``_loose_outcome`` does, inline on a hot loop's path.
                    handled = sites.caught_by_application(error)
                    self._tell(previous, "handled" if handled else "escaped")
            return
        pending = unit.pending
        if pending is None:
            pending = unit.pending = []
        elif len(pending) >= MAX_PENDING:
            self._tell(pending.pop(0), "handled")
        pending.append(access)

    def _wait_in_task(self, access: PendingAccess, asyncio: ModuleType) -> None:
        """Queue an access made outside any unit while an event loop runs on this thread.

        Not held for the thread's next access: that may come from another task while
        this one is suspended in its ``except`` block. If it was made in a task, the
        task's end tells at the sweep (``_loose_outcome``).
        """
        end = self._task_ends.of_running_task(asyncio)
        self._wait_loose(access if end is None else (*access[:P_TASK], end))

    def _wait_loose(self, access: PendingAccess) -> None:
        """Queue an access outside any unit for the sweep; past ``MAX_LOOSE`` the oldest is told."""
        self._loose.append(access)
        if len(self._loose) > MAX_LOOSE:
            self.settle_loose(None, keep=MAX_LOOSE)

    def escaped(self, exc: BaseException) -> None:
        """``exc`` is failing the running unit: the accesses whose errors led to it escaped."""
        unit = self.current_unit() or self._thread().unit
        pending = unit.pending if unit is not None else None
        if not pending:
            return
        chain = {id(e) for e in causes(exc)}
        told = [access for access in pending if id(access[P_ERROR]) in chain]
        if told:
            pending[:] = [access for access in pending if id(access[P_ERROR]) not in chain]
            for access in told:
                self._tell(access, "escaped")

    def settle_now(self) -> None:
        """Tell what waits, for code that asks while it runs (the pytest plugin's
        ``ctxtrace_events``): it caught the errors it made so far, so the running
        unit's accesses were handled; those outside any unit are told as the sweep
        would tell them."""
        unit = self.current_unit() or self._thread().unit
        if unit is not None and unit.pending:
            self._settle(unit)
        self.settle_loose()

    def _settle(self, unit: UnitState) -> None:
        """The unit ended: the accesses whose errors never failed it were handled."""
        pending, unit.pending = unit.pending, None
        for access in pending or ():
            self._tell(access, "handled")

    def settle_loose(self, before_ns: int | None = None, keep: int = 0) -> None:
        """Tell accesses made outside any unit, those before ``before_ns`` (all: None).

        With no unit there is no boundary to watch: the error escaped if it ended
        the program, or was caught by a framework's frame, or ended the asyncio
        task it was made in; it was handled if an application frame caught it
        (``_loose_outcome``).
        """
        loose = self._loose
        if not keep:
            self._release_held(before_ns)
        told: list[tuple[PendingAccess, Outcome]] = []
        with self._loose_lock:
            while len(loose) > keep:
                access = loose[0]
                if before_ns is not None and access[P_AT] > before_ns:
                    break
                loose.popleft()
                told.append((access, _loose_outcome(access)))
        for access, outcome in told:
            self._tell(access, outcome)

    def _release_held(self, before_ns: int | None) -> None:
        """Queue the accesses threads hold (see ``access``) made before ``before_ns``.

        A thread swaps its held access without a lock, so what is taken here may be
        one it held since: that one waits in the queue for its own turn.
        """
        held = self._held
        for thread, access in list(held.items()):
            if before_ns is not None and access[P_AT] > before_ns:
                continue
            taken = held.pop(thread, None)
            if taken is access:
                self._loose.appendleft(taken)
            elif taken is not None:
                self._loose.append(taken)

    def _tell(self, access: PendingAccess, outcome: Outcome) -> None:
        """Report an access whose outcome is known, or only count it (``core.accesses``)."""
        counted = self._accesses.tell(access[P_KEY], outcome, access[P_REPEAT], access)
        if counted is not None:
            self._emit(_event(access, outcome, counted))

    def settle_all(self) -> None:
        """Tell every access that waits, and what report windows only counted (at stop)."""
        self.settle_loose(None)
        self._sum_up_repeats(None)

    def _sum_up_repeats(self, now_ns: int | None) -> None:
        """Say what report windows only counted: of windows past (``now_ns``), or all."""
        for access, outcome, counted in self._accesses.summaries(now_ns):
            self._emit(_event(access, outcome, counted, summary=True))

    def repeated_accesses(self) -> list[tuple[tuple[str, ...], int]]:
        """Accesses only counted, by (proxy, phase, outcome): the rest of the metric."""
        return self._accesses.repeats.items()

    # -- contexts a module's body pushed while it was imported ----------------

    @staticmethod
    def _imported(entry: Entry) -> bool:
        """Whether ``entry`` was pushed by a module's body while the module was imported.

        The pattern of a module that sets up ``app.app_context().push()`` for
        everything after it: the context stays for the process's life on
        purpose. It is no unit's leak and nothing stale for later units; it is
        reported once, as ``long_lived`` with reason ``import``, when the unit
        that imported the module ends, at the next sweep, or at exit.

        Decided from the push's site when first needed, never on the push
        path: a module body (``<module>``) of a module the import system
        holds. The same lines run as a script (``__main__``, ``runpy``), or a
        module whose import failed (gone from ``sys.modules``), leak as any
        other push does.
        """
        flags = entry[FLAGS]
        if not flags & IMPORT_CHECKED:
            site: Site | None = entry[SITE]
            imported = (
                site is not None
                and site.function == "<module>"
                and site.module not in ("", "__main__")
                and site.module in sys.modules
            )
            flags |= IMPORT_CHECKED | (IMPORTED if imported else 0)
            entry[FLAGS] = flags
        return bool(flags & IMPORTED)

    def _report_imported(self, entry: Entry, thread: ThreadState | None) -> None:
        if not entry[FLAGS] & (LONG_REPORTED | REPORTED):
            entry[FLAGS] |= LONG_REPORTED
            self._report("long_lived", entry, thread, reason="import")

    # -- reporting --------------------------------------------------------

    def _report_once(
        self,
        name: AnomalyName,
        entry: Entry,
        thread: ThreadState | None,
        *,
        reason: str = "",
    ) -> None:
        """Report ``name`` about ``entry`` unless an anomaly named that context already:
        what follows from one mistake is reported once."""
        if not entry[FLAGS] & REPORTED:
            entry[FLAGS] |= REPORTED
            self._report(name, entry, thread, reason=reason)

    def _report(
        self,
        name: AnomalyName,
        entry: Entry,
        thread: ThreadState | None,
        *,
        other: Entry | None = None,
        unit: Unit | None = None,
        reason: str = "",
        repaired: bool = False,
    ) -> None:
        if name not in self._detect:
            return
        where: ThreadState = thread or entry[THREAD]
        self._emit(
            Anomaly(
                name=name,
                context=entry_info(entry),
                flight=self._flight(where),
                at_ns=self._clock(),
                thread_name=where.name,
                other=entry_info(other) if other is not None else None,
                unit=unit,
                reason=reason,
                repaired=repaired,
                carry=entry[CARRY],
            )
        )

    def _report_unknown_double_pop(self, ctx: object, thread: ThreadState) -> None:
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

    def _flight(self, thread: ThreadState) -> tuple[FlightRecord, ...]:
        flight = thread.flight
        if flight is None:
            return ()
        records: list[FlightRecord] = []
        for item in list(flight):
            if isinstance(item, UnitState):
                records.extend(self._request_flight(item))
            else:
                records.append(self._flight_record(*item))
        return tuple(records[-(flight.maxlen or len(records)) :])

    @staticmethod
    def _flight_record(op: str, entry: Entry) -> FlightRecord:
        return FlightRecord(
            op="push" if op == "push" else "pop",
            kind=entry[STATS].kind,
            context_id=entry[ID],
            site=entry[SITE],
            thread_name=entry[THREAD].name,
        )

    def _request_flight(self, unit: UnitState) -> list[FlightRecord]:
        """The story of a request's own contexts, from its one flight record.

        Their pushes; and their pops, if they were popped untracked (nothing
        else can have happened on the thread in between: a push there would
        have given them records, whose pops are then recorded as they happen).
        """
        site = self._endpoint_site(unit.name)
        thread_name = unit.slot.thread.name
        sides = [(REQUEST_SIDE, unit.stats)]
        if unit.dispatch_app is not None:
            sides.insert(0, (APP_SIDE, unit.app_stats))
        ops: list[Literal["push", "pop"]] = ["push"]
        if unit.dispatch is FINISHED:
            ops.append("pop")
        records: list[FlightRecord] = []
        for op in ops:
            for side, stats in sides if op == "push" else reversed(sides):
                records.append(
                    FlightRecord(
                        op=op,
                        kind=stats.kind,
                        context_id=self._dispatch_id(unit, side),
                        site=site,
                        thread_name=thread_name,
                    )
                )
        return records

    # -- reading ----------------------------------------------------------

    def snapshot(self) -> list[StatsSnapshot]:
        """Exact counts per (kind, app), for observable instruments."""
        active: dict[tuple[str, str], int] = {}
        for entry in list(self._live.values()):
            key = (entry[STATS].kind, entry[STATS].app)
            active[key] = active.get(key, 0) + 1
        for unit in list(self._inflight):
            if not unit.dispatch_live():
                continue
            pushed = [unit.stats]
            if is_context(unit.dispatch_app):
                pushed.append(unit.app_stats)
            for stats in pushed:
                key = (stats.kind, stats.app)
                active[key] = active.get(key, 0) + 1
        return [
            StatsSnapshot(
                kind=s.kind,
                app=s.app,
                pushes=read_count(s.pushes),
                pops=read_count(s.pops),
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
        if entry is not None:
            return int(entry[ID])
        unit = self._dispatching_unit(ctx)
        if unit is None:
            return None
        return self._dispatch_id(unit, REQUEST_SIDE if unit.dispatch is ctx else APP_SIDE)

    def live_count(self) -> int:
        """How many contexts have records (a request's untracked own contexts do not)."""
        return len(self._live)
