"""Failing open: an error inside ctxtrace is counted, logged once and swallowed.

Every piece of agent code that runs inside the host's call goes through
``InternalErrors.record`` from an ``except`` clause; the host's own call always
runs exactly once and returns or raises exactly what it did.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from ctxtrace.core.counters import read_count


class InternalErrors:
    """Per-component counts of swallowed errors; the first of each is logged."""

    def __init__(self, log_first: Callable[[str, BaseException], None]) -> None:
        self._log_first = log_first
        self._counts: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()

    def record(self, component: str, exc: BaseException) -> None:
        try:
            counter = self._counts.get(component)
            first = False
            if counter is None:
                with self._lock:
                    counter = self._counts.get(component)
                    if counter is None:
                        counter = self._counts[component] = itertools.count()
                        first = True
            next(counter)
            if first:
                self._log_first(component, exc)
        except Exception:
            pass

    def counts(self) -> dict[str, int]:
        return {name: read_count(c) for name, c in list(self._counts.items())}


def run_within(
    timeout_s: float, work: Callable[[], object], component: str,
    record: Callable[[str, BaseException], None],
) -> bool:
    """Run ``work`` on a thread of its own and wait for it ``timeout_s`` at most.

    For flushes and shutdowns of exporters, whose own timeouts (and retries) can
    add up to minutes while a collector hangs: the caller (``uninstrument()``,
    exit, the end of a job) goes on after ``timeout_s``, and the thread, a
    daemon, finishes or dies with the process. An error in ``work`` is recorded
    under ``component``; ``False`` when ``work`` is still running.
    """

    def guarded() -> None:
        try:
            work()
        except Exception as exc:
            record(component, exc)

    thread = threading.Thread(target=guarded, name=f"ctxtrace-{component}-stop", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    return not thread.is_alive()
