"""A forked child's inherited private provider, replaced once, by whoever needs it first.

The same replacement serves a process whose name changed after its provider was
built (``renew``): the provider's Resource names the worker.

In a forked child the parent's private provider must give way to the child's own,
but not inside ``os.fork()``: building one takes locks that only later fork hooks
release (the SDK's resource detection takes concurrent.futures' lock). So the
child holds the inherited one, and the first of its timer, tick, span, flush or
stop replaces it; the others find nothing left to do. An RQ work-horse's job is
often over before any timer fires, which is why every one of them may ask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inherited(Generic[T]):
    """Holds what a fork left behind until ``replace`` retires it and builds anew."""

    def __init__(
        self,
        retire: Callable[[T], None],
        build: Callable[[], None],
        record: Callable[[BaseException], None],
    ) -> None:
        self._retire = retire
        self._build = build
        self._record = record
        self._lock = threading.Lock()
        #: The inherited provider still waiting to be replaced (read without the lock:
        #: callers check it before paying for ``replace``).
        self.held: T | None = None

    def hold(self, inherited: T) -> None:
        """At fork: keep ``inherited`` until ``replace`` (a fresh lock: the parent's
        may have been held by another thread when it forked)."""
        self._lock = threading.Lock()
        self.held = inherited

    def replace(self) -> None:
        """Retire what is held and build the child's own, once; never raises (what
        asked goes on without a provider)."""
        with self._lock:
            held, self.held = self.held, None
            if held is None:
                return
            try:
                self._retire(held)
                self._build()
            except Exception as exc:
                self._record(exc)

    def renew(self, current: T) -> None:
        """Outside a fork: retire ``current`` and build anew now (the worker it names
        changed). Never raises, like ``replace``."""
        with self._lock:
            self.held = current
        self.replace()
