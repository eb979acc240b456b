"""Who started the running thread, when a unit of work did.

A thread begins its own unit, but the bug behind an out-of-context access in it
usually sits in the request or task that started it. The thread integration
records that unit here for the thread's lifetime; the hook layer reads it when
it reports an access.

Keyed by thread, not a ContextVar: asgiref's ``async_to_sync`` copies every
ContextVar its event-loop thread holds back into the calling thread, which
would then claim to have been started by its own request for good. The ident
is ``threading.get_ident`` looked up at each call: gevent may patch it (to a
greenlet's) after ctxtrace was imported.
"""

from __future__ import annotations

import os
import threading

from ctxtrace._events import Unit


class StartedBy:
    """The starting unit of each live instrumented thread (one entry per such thread)."""

    __slots__ = ("_by_thread",)

    def __init__(self) -> None:
        self._by_thread: dict[int, Unit] = {}

    def get(self) -> Unit | None:
        """The unit that started the calling thread, if one did."""
        return self._by_thread.get(threading.get_ident())

    def enter(self, unit: Unit | None) -> None:
        if unit is None:
            self._by_thread.pop(threading.get_ident(), None)
        else:
            self._by_thread[threading.get_ident()] = unit

    def leave(self) -> None:
        self._by_thread.pop(threading.get_ident(), None)

    def after_fork(self) -> None:
        """Only the forking thread lives on in a child; the others' idents may be reused."""
        mine = self._by_thread.get(threading.get_ident())
        self._by_thread = {} if mine is None else {threading.get_ident(): mine}


started_by = StartedBy()
os.register_at_fork(after_in_child=started_by.after_fork)
