"""Work done off the request thread, the wrong way and the right way.

:func:`run_in_thread` runs one task in a short-lived thread and waits for it with a bound, so a
view can report what happened in the thread and no thread outlives its request for long. A
task's exception is caught and logged inside the thread: a fault scenario must never take the
worker process down.

The tasks below are the background code of the scenarios "thread-config", "push-no-pop",
"import-time" and "extension-before-init"; :func:`restock_check_in` is the corrected form of the
first one.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Generic, TypeVar

from flask import Flask, current_app

from .extension import inventory

log = logging.getLogger(__name__)

T = TypeVar("T")

_LAZY_SETTINGS = f"{__name__.rpartition('.')[0]}.lazy_settings"
_import_lock = threading.Lock()


@dataclass(frozen=True)
class TaskOutcome(Generic[T]):
    """What a background task returned or raised, as seen by the view that started it."""

    name: str
    value: T | None = None
    error: Exception | None = None
    # False when the task was still running after the view stopped waiting.
    finished: bool = True


def run_in_thread(task: Callable[[], T], *, name: str, timeout: float) -> TaskOutcome[T]:
    """Run ``task`` in a new thread named ``name`` and wait at most ``timeout`` seconds."""
    outcomes: list[TaskOutcome[T]] = []

    def target() -> None:
        try:
            outcomes.append(TaskOutcome(name, value=task()))
        except Exception as exc:
            # Logged here, in the thread, the way a real job runner reports a failed job. One
            # line at warning level (Flask's messages run to several); the traceback at debug.
            summary = str(exc).partition("\n")[0]
            log.warning("background task %s failed: %s: %s", name, type(exc).__name__, summary)
            log.debug("background task %s failed", name, exc_info=exc)
            outcomes.append(TaskOutcome(name, error=exc))
            # The job failed: let it end its thread, as an unhandled error does, rather
            # than pass for a fallback the shop chose (ctxtrace tells the two apart).
            raise

    # An empty contextvars.Context is what a plain thread starts with on CPython's default
    # build. The free-threaded build of Python 3.14 lets new threads inherit the starter's
    # context (sys.flags.thread_inherit_context), which would hand the request's app context
    # to the task and hide every fault below; starting from an empty one keeps them honest.
    thread = threading.Thread(
        target=contextvars.Context().run, args=(target,), name=name, daemon=True
    )
    thread.start()
    thread.join(timeout)
    if outcomes:
        return outcomes[0]
    log.warning("background task %s still running after %.1f s", name, timeout)
    return TaskOutcome(name, finished=False)


def restock_check() -> list[int]:
    """Ids of items below the low-stock threshold.

    Reads ``current_app.config``: fine in a request or a CLI command, Flask's "Working outside
    of application context" when a view hands this function to a plain thread (the fault).
    """
    threshold = int(current_app.config["SHOP_LOW_STOCK_THRESHOLD"])
    return [item.id for item in inventory.store().all() if item.stock < threshold]


def restock_check_in(app: Flask) -> list[int]:
    """:func:`restock_check` done right: the view passes the app object, the thread pushes
    its own context and the ``with`` block pops it whatever happens."""
    with app.app_context():
        return restock_check()


class ReportError(Exception):
    """The report export could not finish."""


def export_report(app: Flask) -> int:
    """Export the item table to the configured sink; return the number of rows written.

    Written the way it often is: push by hand, pop at the end. When the export fails halfway
    the ``pop()`` is never reached, so the context stays pushed, its teardown never runs and
    its inventory session stays checked out (the fault "push-no-pop"). The fix is
    ``with app.app_context():``, as in :func:`restock_check_in`.
    """
    ctx = app.app_context()
    ctx.push()
    rows = inventory.session().all()
    sink = current_app.config["SHOP_REPORT_SINK"]
    if sink != "log":
        raise ReportError(f"no usable report sink configured (SHOP_REPORT_SINK={sink!r})")
    for item in rows:
        log.info("report row: %s,%s,%s", item.id, item.name, item.stock)
    ctx.pop()
    return len(rows)


def load_lazy_settings() -> ModuleType:
    """Import :mod:`ctxtrace.example.lazy_settings` lazily, from wherever this runs.

    From a thread that has no app context the import fails (the fault "import-time"). A
    failed import is not cached, but one that once succeeded inside some context would be:
    dropping it first makes every call run the module body again, so the demo can repeat the
    fault. The lock keeps two threads from dropping the module while the other imports it.
    """
    with _import_lock:
        sys.modules.pop(_LAZY_SETTINGS, None)
        return importlib.import_module(_LAZY_SETTINGS)
