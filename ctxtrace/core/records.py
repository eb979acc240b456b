"""The ledger's records: per-(kind, app) counts, per-thread facts, units of work, entries.

Kept apart from the ledger's rules so that each record's shape, and the states a
request's own contexts go through, can be read at a glance. Plain Python, no I/O.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

from ctxtrace._config import default_of
from ctxtrace._events import ANOMALY_KINDS, ContextInfo, FlightRecord, Kind, Phase, Site, Unit
from ctxtrace.core.accesses import AccessKey
from ctxtrace.core.names import safe_name
from ctxtrace.core.tasks import TaskEnd


class Marker:
    """A named sentinel for a unit's dispatch state."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


# ``UnitState.dispatch`` is None before the request's own context is pushed,
# DISPATCHING while Flask pushes it, the context itself while it is pushed and
# untracked, FINISHED once popped so, and HANDED_OVER once it has a record of
# its own. ``UnitState.dispatch_app`` is None, or the app context Flask <= 3.1
# pushed for the request (its pop is counted with the request context's, which
# encloses it), or HANDED_OVER.
DISPATCHING: Final = Marker("dispatching")
FINISHED: Final = Marker("finished")
HANDED_OVER: Final = Marker("handed over")
# Which of a request's own contexts an id or record is about.
REQUEST_SIDE: Final = 0
APP_SIDE: Final = 1


# Units are numbered per process, when first described.
UNIT_IDS: Final = itertools.count(1)


def is_context(state: object) -> bool:
    """Whether a unit's dispatch state is a context (pushed, untracked), not a marker."""
    return state is not None and state.__class__ is not Marker



class Stats:
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


#: An out-of-context access not told yet: what its event will carry, and the error
#: the caller got (``Ledger.access``). A tuple: the event itself is built once, when
#: its outcome is known. The indices are named here.
PendingAccess: TypeAlias = tuple[
    str, "Site | None", "Phase", str, BaseException, "Unit | None",
    "tuple[FlightRecord, ...]", int, "Unit | None", object, "AccessKey", bool,
    TaskEnd | None,
]
P_ERROR: Final = 4
P_AT: Final = 7
#: Its key in the report windows, and whether it repeats one its window reported
#: (``core.accesses``).
P_KEY: Final = 10
P_REPEAT: Final = 11
#: Outside any unit, in an asyncio task: how that task ended (``core.tasks``).
P_TASK: Final = 12


class ThreadState:
    """Per-thread facts captured once: identity and the flight record."""

    __slots__ = ("flight", "ident", "name", "thread", "unit")

    def __init__(self, flight: int) -> None:
        current = threading.current_thread()
        # The innermost unit begun on this thread by an integration (a thread, task,
        # command, job, test), for code that runs in another ``contextvars.Context``
        # on it (``Context().run``), where the unit slot's ContextVar does not reach.
        self.unit: UnitState | None = None
        self.ident = current.ident or 0
        self.name = safe_name(current.name)
        self.thread: weakref.ref[threading.Thread] = weakref.ref(current)
        # ``(op, entry)``, or a request unit standing for its untracked own contexts.
        self.flight: deque[tuple[str, Entry] | UnitState] | None = (
            deque(maxlen=flight) if flight else None
        )

    def alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()


class UnitSlot:
    """Which unit of work runs on one thread: ``unit``, changed as units begin and end.

    A ContextVar holds the slot, set once per thread, rather than the unit, set
    and reset per unit: a ContextVar ``set`` builds a new Context mapping (a set
    and reset took 110 to 350 ns here, more the more variables the Context
    holds), an attribute store does not.
    A Context copied into another thread (asgiref, ``copy_context().run``)
    still holds the first thread's slot: ``ident`` tells, and a unit begun
    there gets a slot of its own thread's.
    """

    __slots__ = ("ident", "thread", "unit")

    def __init__(self, ident: int, thread: ThreadState) -> None:
        self.ident = ident
        self.unit: UnitState | None = None
        #: The thread's facts, for the units begun in this slot.
        self.thread = thread


#: The slot of a Context in which no unit began yet: its ``unit`` stays None (so
#: no unit ever reads its ``thread``).
NO_SLOT: Final = UnitSlot(0, cast(ThreadState, None))


class UnitState:
    """A unit of work while it runs; ``finished`` turns its leftovers stale.

    A request unit also carries the contexts Flask pushed to dispatch it while
    they are untracked: ``dispatch`` and ``dispatch_app`` (see the markers
    above; the hook layer sets DISPATCHING, the app context, and FINISHED when
    Flask pops the request context from the top), and, set when the request
    context is pushed, their counters and the push time (the thread is its slot's). Their
    depths, ids and full records wait in ``detail`` until something needs them.
    """

    # No ``__slots__``: the class holds every default, so starting a request stores
    # only what it reads on every request (``Ledger.begin_request``), not all of them.
    kind = "request"
    name = "request"
    finished = False
    checked = False
    # Whether a tracked context was pushed in this unit: only then can it leave any.
    tracked = False
    dispatch: object = None
    dispatch_app: object = None
    detail: DispatchDetail | None = None
    # What rides along for the request's span (``CTXTRACE_SPANS=all``): see ``Ledger``.
    carry: object = None
    # Out-of-context accesses not told yet, with the error each raised: see
    # ``Ledger.access``.
    pending: list[PendingAccess] | None = None
    # The thread's unit when this one began (``ThreadState.unit``), for non-requests.
    outer_on_thread: UnitState | None = None
    # The unit this one runs inside, and the slot it is the current unit of.
    parent: UnitState | None = None
    slot: UnitSlot
    _id = 0
    _info: Unit | None = None
    _info_name: object = None
    # Set when the request context is pushed (read only once ``dispatch`` is a context).
    stats: Stats
    app_stats: Stats
    pushed_ns: int

    @property
    def id(self) -> int:
        """The unit's number, given on first use: most requests never need one."""
        if not self._id:
            self._id = next(UNIT_IDS)
        return self._id

    def info(self) -> Unit:
        """The unit as events carry it; made once per name (a request is named at dispatch).

        A request's name is its endpoint, set raw on the hot path: cleaned here,
        where it leaves for events, and only then.
        """
        info = self._info
        if info is None or self._info_name is not self.name:
            info = self._info = Unit(id=self.id, kind=self.kind, name=safe_name(self.name))
            self._info_name = self.name
        return info

    # -- the request's own contexts: the hook layer's transitions -------------

    def begin_dispatch(self) -> None:
        """Flask is about to push the request's own context."""
        self.dispatch = DISPATCHING

    def undo_dispatch(self) -> None:
        """That push raised: the request has no context of its own after all."""
        self.dispatch = None

    def end_dispatch(self) -> None:
        """Flask popped the request's own context from the top, untracked."""
        self.dispatch = FINISHED

    def app_pushed_for_dispatch(self, ctx: object) -> None:
        """Flask <= 3.1 pushed an app context for the request (counted with it)."""
        self.dispatch_app = ctx

    def hand_over(self) -> None:
        """The request's own contexts got records of their own: the rules apply to them."""
        self.dispatch = HANDED_OVER
        if self.dispatch_app is not None:
            self.dispatch_app = HANDED_OVER
        self.tracked = True

    def dispatch_live(self) -> bool:
        """Whether the request's own context is pushed and has no record of its own."""
        return is_context(self.dispatch)


class DispatchDetail:
    """What a request's untracked contexts need only when described: depths, ids, records."""

    __slots__ = ("app_depth", "depth", "entries", "ids")

    def __init__(self, depth: int = 1, app_depth: int = 1) -> None:
        self.depth = depth
        self.app_depth = app_depth
        self.ids = [0, 0]
        self.entries: tuple[Entry, Entry | None] | None = None


# One tracked context object, however often it is pushed. A list, not a class:
# building it is the single most frequent thing ctxtrace does, and a list
# display costs a sixth of an ``__init__`` call. The indices are named here.
Entry: TypeAlias = list[Any]
ID, REF, STATS, SITE, THREAD, PUSHED, UNIT, DEPTH, COUNT, FLAGS, OWNER, CARRY = range(12)

# FLAGS bits.
STREAMING = 1  # kept pushed by a streaming response, on purpose
REPORTED = 2  # a stack anomaly named it: what follows from it is not reported again
LONG_REPORTED = 4  # long_lived reported once
ORPHANED = 8  # Flask dropped it from the stack when a context below it was popped
IMPORTED = 16  # pushed by a module's body while it was imported: not any unit's leak
IMPORT_CHECKED = 32  # whether IMPORTED applies was decided (off the push path, when needed)


def entry_info(entry: Entry) -> ContextInfo:
    stats: Stats = entry[STATS]
    thread: ThreadState = entry[THREAD]
    unit: UnitState | None = entry[UNIT]
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

    cap: int = default_of("ledger_cap")
    flight: int = default_of("flight_record")
    long_lived_request_s: float | None = default_of("long_lived_request")
    long_lived_app_s: float | None = default_of("long_lived_app")
    long_lived_streaming: bool = default_of("long_lived_streaming")
    detect: frozenset[str] = frozenset(k.name for k in ANOMALY_KINDS if k.default_on)
    duration_buffer: int = 65_536
    #: Per-site window for out-of-context access reports (``core.accesses``); None: all.
    access_window_s: float | None = default_of("log_rate_window")
