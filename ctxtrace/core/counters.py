"""Exact, lock-free counters: ``itertools.count`` and the one way to read it.

``next()`` on an ``itertools.count`` is atomic under the GIL, so code on the
push path and in any thread can count without a lock and never lose an
increment. Reading one without advancing it goes through its repr: this module
is the only place that knows so.
"""

from __future__ import annotations

import itertools


def read_count(counter: itertools.count[int]) -> int:
    """The value of ``counter`` without advancing it."""
    return int(repr(counter)[6:-1])
