"""Exact, lock-free counters: ``itertools.count`` and the one way to read it.

``next()`` on an ``itertools.count`` is atomic under the GIL, so code on the
push path and in any thread can count without a lock and never lose an
increment. Reading one without advancing it goes through its repr: this module
is the only place that knows so.
"""

from __future__ import annotations

import itertools
import threading


def read_count(counter: itertools.count[int]) -> int:
    """The value of ``counter`` without advancing it."""
    return int(repr(counter)[6:-1])


class ExactCounts:
    """Counters keyed by label values; ``add`` is lock-free after a key's first use.

    ``next()`` on an ``itertools.count`` is atomic under the GIL, so concurrent
    emitters never lose an increment.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], itertools.count[int]] = {}
        self._lock = threading.Lock()

    def add(self, key: tuple[str, ...]) -> None:
        next(self._counts.get(key) or self.counter(key))

    def counter(self, key: tuple[str, ...]) -> itertools.count[int]:
        """The counter behind ``key``, for a caller that counts it often: ``next()`` adds one."""
        counter = self._counts.get(key)
        if counter is None:
            with self._lock:
                counter = self._counts.setdefault(key, itertools.count())
        return counter

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        """What was counted, by key (a key whose counter was taken but never advanced is not)."""
        counted = [(key, read_count(c)) for key, c in list(self._counts.items())]
        return [(key, n) for key, n in counted if n]
