"""Threads as units of work.

A context pushed in a thread and still pushed when the thread's ``run`` returns
is leaked, named after the thread; an out-of-context access in the thread names
the unit that started it (most often a request handing work to a thread).

``Thread.start`` is the one patch: it runs in the starting thread, where the
starting unit is known, and wraps the new thread's ``run`` on the instance. The
instance attribute beats every subclass's own ``run`` (``Timer``, pool workers,
user subclasses) without touching them, and is removed again when ``run`` ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ctxtrace.core import units
from ctxtrace.core.patching import put_wrapper
from ctxtrace.integrations.kit import tell_escaped

if TYPE_CHECKING:
    from ctxtrace._events import Unit
    from ctxtrace._host import Host

#: ctxtrace's own threads (watchdog, exporters) are not units of the application.
_OWN_PREFIX: Final = "ctxtrace-"


def install(host: Host) -> Callable[[], None]:
    # Looked up through the class, not its ``__dict__``: gevent's monkey-patched
    # ``Thread`` inherits ``start``. The patch goes on ``threading.Thread`` itself
    # and ``revert`` removes it again, leaving the inherited one.
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
        if host.running:
            try:
                _wrap_run(host, self)
            except Exception as exc:
                host.errors.record("threads", exc)
        return original(self)

    return put_wrapper(threading.Thread, "start", start, original)


def _wrap_run(host: Host, thread: threading.Thread) -> None:
    if (
        thread.ident is not None  # started already: ``start`` is about to refuse
        or thread.name.startswith(_OWN_PREFIX)
        or isinstance(vars(thread).get("run"), _UnitRun)
    ):
        return
    parent = host.current_unit()
    # Bound now, in the starting thread: the instance attribute set below must
    # not find itself when the new thread looks up ``run``.
    thread.run = _UnitRun(host, thread, thread.run, parent)  # type: ignore[method-assign]


class _UnitRun:
    """The thread's ``run``, inside a unit named after the thread."""

    __slots__ = ("host", "parent", "run", "thread")

    def __init__(
        self, host: Host, thread: threading.Thread, run: Callable[[], Any], parent: Unit | None
    ) -> None:
        self.host = host
        self.thread = thread
        self.run = run
        self.parent = parent

    def __call__(self) -> None:
        __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
        host = self.host
        run = self.run
        try:
            # The instance attribute holds the thread, its target and arguments:
            # drop it now rather than leave a cycle for the collector.
            if vars(self.thread).get("run") is self:
                del self.thread.run
        except Exception as exc:
            host.errors.record("threads", exc)
        if not host.running:
            run()
            return
        try:
            handle = host.begin_unit("thread", self.thread.name)
            units.started_by.enter(self.parent)
        except Exception as exc:
            host.errors.record("threads", exc)
            run()
            return
        try:
            run()
        except BaseException as exc:
            tell_escaped(host, exc, "threads")
            raise
        finally:
            try:
                units.started_by.leave()
                # Still the running agent: one that was stopped meanwhile has
                # stopped watching, and its ledger would report stale news.
                if host.running:
                    host.end_unit(handle)
            except Exception as exc:
                host.errors.record("threads", exc)
