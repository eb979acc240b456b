"""Handing work to another thread with its Flask app and its OpenTelemetry context.

Contexts do not follow work into a thread or an executor. What the work needs
is the app, not the request's context objects (which are not thread-safe and
are popped when the request ends), and the trace it belongs to. So the callable
is bound, where it is handed over, to the current app and the current
OpenTelemetry context; wherever it runs, it runs inside a fresh app context of
that app (its own ``g``) with that OpenTelemetry context attached, and both are
detached and popped on every way out, in reverse order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from flask import Flask
from flask import globals as flask_globals
from opentelemetry import context as otel_context

P = ParamSpec("P")
R = TypeVar("R")


def _app_here(app: Flask | None) -> Flask:
    if app is not None:
        return app
    # Read the stack directly: an empty one is a usage error to explain, not
    # an out-of-context access to report.
    ctx = flask_globals._cv_app.get(None)
    if ctx is None:
        raise RuntimeError(
            "run_in_app_context needs an app: call it inside an app or request context"
            " (where the work is handed over), or pass app=..."
        )
    found: Flask = ctx.app
    return found


def run_in_app_context(func: Callable[P, R], /, *, app: Flask | None = None) -> Callable[P, R]:
    """Bind ``func`` to the current app and OpenTelemetry context, for another thread.

    Call it where the work is handed over, in the request or task::

        threading.Thread(target=run_in_app_context(send_receipt), args=(order_id,)).start()

    Each call of the returned function pushes a fresh app context of that app,
    attaches the captured OpenTelemetry context (spans started inside are
    children of the span that was current here), runs ``func``, then detaches
    and pops whatever ``func`` raised. ``app`` names the app explicitly when
    there is no app context here. Raises ``RuntimeError`` when neither says
    which app.
    """
    flask_app = _app_here(app)
    trace_context = otel_context.get_current()

    @functools.wraps(func)
    def in_app_context(*args: P.args, **kwargs: P.kwargs) -> R:
        with flask_app.app_context():
            token = otel_context.attach(trace_context)
            try:
                return func(*args, **kwargs)
            finally:
                otel_context.detach(token)

    return in_app_context


class ContextExecutor(Executor):
    """A ``concurrent.futures`` executor whose callables run as with ``run_in_app_context``.

    Wraps ``executor`` (by default a new ``ThreadPoolExecutor(max_workers)``) and
    owns it: ``shutdown`` shuts it down. Each ``submit`` (and so ``map``) binds
    the callable to the app and OpenTelemetry context current at submit time;
    ``app`` fixes the app instead.
    """

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        app: Flask | None = None,
        max_workers: int | None = None,
    ) -> None:
        if executor is not None and max_workers is not None:
            raise TypeError("pass either an executor or max_workers, not both")
        self._executor = executor if executor is not None else ThreadPoolExecutor(max_workers)
        self._app = app

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        return self._executor.submit(run_in_app_context(fn, app=self._app), *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)
