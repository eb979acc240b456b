"""Which out-of-context accesses are reported in full, and the exact count of the rest.

A fallback such as ``try: current_app.config except RuntimeError:`` in a hot loop
fails at one site thousands of times a second. A full report (a log line, a span,
the flight record) costs tens of microseconds; the first one at a site in each
window tells the story, and the rest only need counting for the metrics to stay
exact. The window is the log rate window: "off" reports every access in full.

The ledger asks twice. When the access happens (``is_repeat``): a repeat skips
what only a full report needs (the flight record, the trace context). When its
outcome is known (``tell``): a repeat whose outcome the window already reported
is counted here and becomes no event; one whose outcome is new (an escaped access
after handled ones at the same site) is still reported, so a page-worthy escape
never hides behind a fallback that catches. What no report mentioned is said in
a summary once its window has passed (``summaries``, from the sweep) or at stop.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Final, Generic, TypeVar

from ctxtrace.core.counters import ExactCounts

if TYPE_CHECKING:
    from ctxtrace._events import Outcome, Phase

#: (proxy, file, line, phase): where an access happened, as the windows tell them apart.
AccessKey = tuple[str, str, int, "Phase"]
T = TypeVar("T")
#: Sites followed at once; past it the windows start over (more full reports; the metric
#: still counts every access, a log summary may miss what was forgotten).
_MAX_SITES: Final = 4096


class _Window(Generic[T]):
    """One site's window: when it started, which outcomes it reported, what it counted."""

    __slots__ = ("reported", "since", "start_ns")

    def __init__(self, start_ns: int, carried: dict[Outcome, tuple[int, T]]) -> None:
        self.start_ns = start_ns
        #: The outcomes this window reported, each with the counter of its repeats.
        self.reported: dict[Outcome, itertools.count[int]] = {}
        #: outcome -> (accesses only counted since that outcome was last reported,
        #: the last of them); carried into the next window until reported or summed up.
        self.since = carried


class AccessWindow(Generic[T]):
    """Per-site report windows, and the counts of accesses that were only counted.

    ``T`` is what the caller keeps of an access (the ledger's pending access): the
    last one counted at a site stands for the others in a summary.
    """

    def __init__(self, window_s: float | None) -> None:
        self._window_ns = None if window_s is None else int(window_s * 1e9)
        self._sites: dict[AccessKey, _Window[T]] = {}
        #: (proxy, phase, outcome) -> accesses only counted (never an event of their own).
        self.repeats = ExactCounts()

    def is_repeat(self, key: AccessKey, now_ns: int) -> bool:
        """Whether ``key`` is inside a window already; if not, a window starts with it."""
        window = self._window_ns
        if window is None:
            return False
        sites = self._sites
        state = sites.get(key)
        if state is not None and now_ns - state.start_ns < window:
            return True
        if len(sites) >= _MAX_SITES:
            sites.clear()
        sites[key] = _Window(now_ns, {} if state is None else state.since)
        return False

    def tell(self, key: AccessKey, outcome: Outcome, repeat: bool, access: T) -> int | None:
        """For an access whose outcome is now known: ``None`` when it is only counted
        (a repeat whose outcome its window reported), else how many accesses like it
        were only counted since its outcome was last reported.

        Races between threads can only turn a count into one more full report, or
        misplace one in that number; ``repeats`` stays exact.
        """
        state = self._sites.get(key)
        if state is None:
            return 0
        repeats = state.reported.get(outcome) if repeat else None
        if repeats is not None:
            next(repeats)
            counted = state.since.get(outcome)
            state.since[outcome] = (1 if counted is None else counted[0] + 1, access)
            return None
        state.reported[outcome] = self.repeats.counter((key[0], key[3], outcome))
        counted = state.since.pop(outcome, None)
        return 0 if counted is None else counted[0]

    def summaries(self, now_ns: int | None) -> list[tuple[T, Outcome, int]]:
        """``(last access, outcome, count)`` for what windows only counted, of every
        site (``now_ns`` None: at exit) or of those whose window has passed (the next
        access, which would have said so, may never come); then counted as said."""
        window = self._window_ns
        due: list[tuple[T, Outcome, int]] = []
        for state in list(self._sites.values()):
            if not state.since:
                continue
            if now_ns is not None and window is not None and now_ns - state.start_ns < window:
                continue
            since, state.since = state.since, {}
            due += [(access, outcome, n) for outcome, (n, access) in since.items()]
        return due
