"""Which shape of Flask is installed, found from its classes rather than its version.

Flask 2.3-3.1 keep separate ``AppContext`` and ``RequestContext`` classes on two
ContextVar stacks, count pushes as a list of tokens, and may pop in the wrong
order before complaining. The next release merges them into one ``AppContext``
(a request context is an app context that carries a request) on one stack,
counts pushes in ``_push_count`` and refuses a bad pop before changing anything.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import flask.ctx
import flask.globals

from ctxtrace._events import Kind


@dataclass(frozen=True, slots=True)
class FlaskShape:
    """The context classes to hook and how to read their state."""

    merged: bool
    app_context: type[Any]
    request_context: type[Any] | None

    @property
    def slots(self) -> tuple[str, ...]:
        return ("app",) if self.merged else ("app", "request")

    def push_count(self, ctx: Any) -> int:
        """How many times Flask thinks ``ctx`` is pushed right now."""
        if self.merged:
            return int(ctx._push_count) if ctx._cv_token is not None else 0
        return len(ctx._cv_tokens)

    def kind(self, ctx: Any) -> Kind:
        if self.merged:
            return "request" if getattr(ctx, "_request", None) is not None else "app"
        return "app" if isinstance(ctx, self.app_context) else "request"

    def slot(self, kind: Kind) -> str:
        return "app" if self.merged else kind

    def endpoint(self, ctx: Any) -> str | None:
        """The endpoint a dispatched request matched, read from Flask's routing only."""
        try:
            request = ctx._request if self.merged else ctx.request
            endpoint = request.url_rule.endpoint
        except AttributeError:
            return None
        return endpoint if isinstance(endpoint, str) else None

    def top_var(self, kind: Kind) -> ContextVar[Any]:
        """The ContextVar whose value is the top of the stack a context of ``kind`` is on."""
        if kind == "request" and not self.merged:
            request_var: ContextVar[Any] = vars(flask.globals)["_cv_request"]
            return request_var
        return flask.globals._cv_app


def detect() -> FlaskShape:
    """Read the shape of the installed Flask."""
    request_context = vars(flask.ctx).get("RequestContext")
    return FlaskShape(
        merged=request_context is None,
        app_context=flask.ctx.AppContext,
        request_context=request_context,
    )
