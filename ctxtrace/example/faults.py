"""One endpoint per seeded context fault, plus the corrected form where one is worth showing.

Every endpoint answers 200 with a JSON body that says what happened (``error`` is the exception
the faulty code raised, or null), so a load generator can drive them without the worker
process, or the request, failing. What each fault looks like to a context tracer is listed in
:mod:`ctxtrace.example.scenarios`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import Blueprint, Flask, current_app, g, has_app_context

from .extension import audit, inventory
from .worker import (
    TaskOutcome,
    export_report,
    load_lazy_settings,
    restock_check,
    restock_check_in,
    run_in_thread,
)

if TYPE_CHECKING:
    from flask.ctx import AppContext
    from werkzeug.local import LocalProxy

bp = Blueprint("faults", __name__)

# Put on `g` by /fault/stale-g and looked for by /whoami. A fixed string: a leak demo must never
# carry real user data from one request into another.
LEAKED_MARKER = "set-by-/fault/stale-g"

T = TypeVar("T")


def _real_app() -> Flask:
    # A thread must be handed the app object itself: the current_app proxy resolves per thread
    # and is unbound in a new one.
    return cast("LocalProxy[Flask]", current_app)._get_current_object()


def _is_active(ctx: AppContext) -> bool:
    # Each app context has its own `g`, which makes it a public way to tell which one is active.
    return has_app_context() and cast("LocalProxy[object]", g)._get_current_object() is ctx.g


def _error_json(error: BaseException | None) -> dict[str, str] | None:
    if error is None:
        return None
    return {"type": type(error).__name__, "message": str(error)}


def _task_json(scenario: str, outcome: TaskOutcome[T]) -> dict[str, Any]:
    value = outcome.value
    return {
        "scenario": scenario,
        "thread": outcome.name,
        "finished": outcome.finished,
        "result": value if value is None or isinstance(value, (int, list)) else repr(value),
        "error": _error_json(outcome.error),
    }


def _timeout() -> float:
    return float(current_app.config["SHOP_BACKGROUND_TIMEOUT_S"])


@bp.get("/fault/thread-config")
def thread_config() -> dict[str, Any]:
    """Run the restock check in a plain thread, which has no app context."""
    outcome = run_in_thread(restock_check, name="restock-check", timeout=_timeout())
    return _task_json("thread-config", outcome)


@bp.get("/ok/thread-config")
def thread_config_fixed() -> dict[str, Any]:
    """The same check, with the app passed to the thread and a ``with`` context there."""
    task = partial(restock_check_in, _real_app())
    outcome = run_in_thread(task, name="restock-check", timeout=_timeout())
    return _task_json("thread-config", outcome)


@bp.get("/fault/push-no-pop")
def push_no_pop() -> dict[str, Any]:
    """Run the report export, which pushes a context by hand and fails before popping it.

    The export runs in a job thread, so the leaked context cannot disturb this request's own
    context and the answer is 200 on every Flask version. The leak stays visible in
    ``open_inventory_sessions``, which grows by one per call.
    """
    task = partial(export_report, _real_app())
    outcome = run_in_thread(task, name="report-export", timeout=_timeout())
    body = _task_json("push-no-pop", outcome)
    body["open_inventory_sessions"] = inventory.open_sessions()
    return body


@bp.get("/fault/import-time")
def import_time() -> dict[str, Any]:
    """Import the module that reads config at import time, from a thread without a context."""
    outcome = run_in_thread(load_lazy_settings, name="settings-loader", timeout=_timeout())
    return _task_json("import-time", outcome)


@bp.get("/fault/extension-before-init")
def extension_before_init() -> dict[str, Any]:
    """Hand an audit entry to a writer thread; ``audit`` was never given to ``init_app``."""
    task = partial(audit.record, "items.viewed")
    outcome = run_in_thread(task, name="audit-writer", timeout=_timeout())
    return _task_json("extension-before-init", outcome)


@bp.get("/fault/wrong-order")
def wrong_order() -> dict[str, Any]:
    """Push two app contexts and pop them in push order instead of in reverse.

    The first pop fails: ``AssertionError`` on Flask up to 3.1, ``RuntimeError`` on 3.2. The
    view catches it and unwinds what is left, so this thread serves its next request clean.
    """
    app = _real_app()
    opened = [app.app_context(), app.app_context()]
    for ctx in opened:
        ctx.push()
    error: BaseException | None = None
    try:
        for ctx in opened:  # the fault: contexts must be popped newest first
            ctx.pop()
    except (AssertionError, RuntimeError) as exc:
        error = exc
    return {"scenario": "wrong-order", "error": _error_json(error), "unwound": _unwind(opened)}


def _unwind(opened: Sequence[AppContext]) -> int:
    """Pop those of ``opened`` that are still active, newest first; return how many.

    Flask up to 3.1 resets the context variable *before* it checks the order, so the failed
    pop of the first context already restored the request's context: nothing is active here,
    nothing is popped, and the second context is left pushed-but-unreachable (its teardown never
    runs). Flask 3.2 checks before it changes anything, so both are still active and are
    popped here in the right order.
    """
    popped = 0
    for ctx in reversed(opened):
        if not _is_active(ctx):
            break
        ctx.pop()
        popped += 1
    return popped


@bp.get("/fault/stale-g")
def stale_g() -> dict[str, Any]:
    """Mark ``g``; the RequestTimer middleware then leaks the context (this path is over budget)."""
    g.leaked_marker = LEAKED_MARKER
    return {
        "scenario": "stale-g",
        "marker": LEAKED_MARKER,
        # Set by the middleware on its own context: visible here only while requests reuse
        # that context (Flask up to 3.1).
        "latency_budget_ms": g.get("latency_budget_ms"),
        "thread": _thread_name(),
    }


@bp.get("/whoami")
def whoami() -> dict[str, Any]:
    """Report whether this request's ``g`` carries what an earlier request put there."""
    return {
        "leaked_marker": g.get("leaked_marker"),
        "g_attributes": sorted(g),
        "thread": _thread_name(),
    }


def _thread_name() -> str:
    return threading.current_thread().name
