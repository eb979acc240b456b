"""WSGI middleware that times requests against per-path latency budgets: a seeded fault.

For a path with a budget it pushes an app context around the inner app, reusing one that is
already active the way Flask up to 3.1 does, and puts the budget on ``g``: up to 3.1 the request
reuses that context, so the view sees ``g.latency_budget_ms``. Its slow path returns before
popping the context it pushed, so after a request over budget that context stays active on the
worker thread (scenario "stale-g"):

* Flask up to 3.1: the next request served by that thread finds the leftover context, reuses
  it, and sees the ``g`` of the slow request; teardown_appcontext no longer runs for requests
  on that thread.
* Flask 3.2 (pallets/flask main): each request pushes a context of its own, so ``g`` is fresh
  (and the view no longer sees the budget either), but the leftover context stays pushed, and
  leaked, for the life of the thread.

The fix is ``with self._app.app_context():`` around the timed call, and passing the budget to
views some other way than a ``g`` shared across contexts.

Paths without a budget pass straight through. That also keeps the middleware away from
streamed responses: its context is popped before the body streams, which
``stream_with_context`` only copes with on Flask 3.1, so do not give ``/stream`` a budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask, current_app, g, has_app_context

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class RequestTimer:
    """Wraps ``app.wsgi_app``; logs a warning for requests slower than their path's budget."""

    def __init__(self, app: Flask, wsgi_app: WSGIApplication) -> None:
        self._app = app
        self._wsgi_app = wsgi_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Time one request (the body is not included: it may stream after this returns)."""
        path = environ.get("PATH_INFO", "")
        budget_ms = self._app.config["SHOP_LATENCY_BUDGETS_MS"].get(path)
        if budget_ms is None:
            return self._wsgi_app(environ, start_response)

        pushed = None
        if not has_app_context():
            pushed = self._app.app_context()
            pushed.push()
        g.latency_budget_ms = budget_ms
        started = time.perf_counter()
        app_iter = self._wsgi_app(environ, start_response)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if elapsed_ms > budget_ms:
            current_app.logger.warning(
                "%s took %.2f ms, over its %.2f ms budget", path, elapsed_ms, budget_ms
            )
            # The fault: this early return skips the pop below.
            return app_iter
        if pushed is not None:
            pushed.pop()
        return app_iter
