"""What rides along with a context from its push to its span: the trace it belongs to.

The ledger calls ``capture`` at every push (only when spans are on) and keeps the
result with the context; it comes back in ``ContextPushed.carry``,
``ContextPopped.carry`` and ``Anomaly.carry``. A late span, made when an anomaly
is found long after the push, still gets the parent it would have had at push.

This module is the one bridge between Flask's context variables and
OpenTelemetry's. OpenTelemetry's Flask instrumentation starts its server span in
``before_request``, after Flask pushed the request context (and the app context
the request pushes for itself), so the span current at those pushes is the one
*around* the server span, usually none. For a push while a request is on top,
the carry therefore also keeps the request's WSGI environ, where the
instrumentation stores its server span, and its URL rule (for ``http.route``);
``parent_context`` prefers that server span when nothing was current at push.

A carry is the OpenTelemetry ``Context`` alone, or ``(Context, environ, rule)``.
It never references the Flask context itself: the ledger finds leaks by the
context object being garbage-collected while pushed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import FrameType
from typing import Any, Final

import flask.ctx
from flask import globals as flask_globals
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

# Where opentelemetry-instrumentation-flask keeps the server span of a request
# (its ``_ENVIRON_SPAN_KEY``, unchanged since 0.20b0).
OTEL_FLASK_SPAN_KEY: Final = "opentelemetry-flask.span_key"


def _context_getter() -> Callable[[], Context]:
    """The cheapest call that returns OpenTelemetry's current context.

    ``capture`` runs at every tracked push. With OpenTelemetry's default runtime
    context (a ContextVar, the one every Python process uses unless
    ``OTEL_PYTHON_CONTEXT`` names another), that ContextVar's own ``get`` is what
    ``get_current`` ends in, two Python calls later; any other runtime gets the
    public function.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(var, ContextVar):
        getter: Callable[[], Context] = var.get
        return getter
    return otel_context.get_current


_get_current = _context_getter()
# Flask <= 3.1 keeps request contexts on a stack of their own; later versions
# put them on the app stack, as app contexts that carry a request.
_request_var: Any = getattr(flask_globals, "_cv_request", None)
_app_var: Any = flask_globals._cv_app
_REQUEST_CONTEXT: Any = vars(flask.ctx).get("RequestContext")
_CTX_FILE: Final = flask.ctx.__file__


def capture(request_ctx: Any = None) -> object:
    """Called by the ledger at each push: the OpenTelemetry context (and the request's).

    ``request_ctx`` is given for a request context the ledger records only after
    its push (it tracks the contexts Flask pushes to dispatch a request lazily):
    the carry then names that request, as it would have at its push.
    """
    current = _get_current()
    if request_ctx is not None:
        request = request_ctx.request if _request_var is not None else request_ctx._request
        return (current, request.environ, request.url_rule)
    if _request_var is not None:
        ctx = _request_var.get(None)
        if ctx is None:
            return current
        request = ctx.request
    else:
        request = getattr(_app_var.get(None), "_request", None)
        if request is None:
            return current
    return (current, request.environ, request.url_rule)


def otel_part(carry: object) -> Context | None:
    """The OpenTelemetry context a carry holds."""
    if isinstance(carry, tuple):
        carry = carry[0]
    return carry if isinstance(carry, Context) else None


def environ_part(carry: object) -> Mapping[str, Any] | None:
    """The WSGI environ of the request that was on top at push, if one was."""
    if isinstance(carry, tuple) and len(carry) == 3 and isinstance(carry[1], dict):
        return carry[1]
    return None


def route_of(carry: object) -> str | None:
    """The URL rule the request on top at push had matched (``http.route``)."""
    if isinstance(carry, tuple) and len(carry) == 3:
        route = getattr(carry[2], "rule", None)
        if isinstance(route, str):
            return route
    return None


def server_span(environ: Mapping[str, Any] | None) -> trace.Span | None:
    """The server span OpenTelemetry's Flask instrumentation made for a request."""
    if environ is None:
        return None
    span = environ.get(OTEL_FLASK_SPAN_KEY)
    return span if isinstance(span, trace.Span) and span.get_span_context().is_valid else None


def parent_context(
    carry: object, fallback_environ: Mapping[str, Any] | None = None
) -> Context | None:
    """The parent for a context's span.

    The span current at push if there was one; else the server span of the
    request on top at push (or of ``fallback_environ``, the request that pushed
    this context for itself); else whatever the push-time context holds (a
    remote parent, or nothing).
    """
    pushed = otel_part(carry)
    if pushed is not None and trace.get_current_span(pushed).get_span_context().is_valid:
        return pushed
    span = server_span(environ_part(carry)) or server_span(fallback_environ)
    if span is not None:
        return trace.set_span_in_context(span, pushed)
    return pushed


def dispatching_environ(max_frames: int = 40) -> Mapping[str, Any] | None:
    """The environ of the request context being pushed or popped up this thread's stack.

    For an anomaly of the app context a request pushes for itself (Flask <= 3.1):
    it is pushed before the request is on its stack, and found wrong while the
    request pops it. Called only when such an anomaly becomes a span.
    """
    if _REQUEST_CONTEXT is None:
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_frames):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_filename == _CTX_FILE and code.co_name in ("pop", "push"):
            ctx = frame.f_locals.get("self")
            if isinstance(ctx, _REQUEST_CONTEXT):
                environ = getattr(ctx.request, "environ", None)
                return environ if isinstance(environ, dict) else None
        frame = frame.f_back
    return None


def route_for_endpoint(app_name: str, endpoint: str) -> str | None:
    """The URL rule of ``endpoint``, read from the current app if it is the one named."""
    app = getattr(_app_var.get(None), "app", None)
    if app is None or getattr(app, "name", None) != app_name:
        return None
    try:
        for rule in app.url_map.iter_rules(endpoint):
            return str(rule.rule)
    except (KeyError, AttributeError):
        return None
    return None
