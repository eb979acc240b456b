"""A structlog processor that adds the current Flask context to every log line.

Add ``ctxtrace.processors.add_flask_context`` to your own structlog processors
to see, on each line, which kind of context was active, ctxtrace's id for it
(when ctxtrace is on) and the request's endpoint. Only these code-level names
are added: never the URL, headers or anything from ``g`` or the session.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from flask import globals as flask_globals

from ctxtrace import _agent
from ctxtrace.core.flaskshape import detect
from ctxtrace.core.names import safe_name

_SHAPE = detect()


def _active_context() -> Any:
    request_var = getattr(flask_globals, "_cv_request", None)
    if request_var is not None:
        ctx = request_var.get(None)
        if ctx is not None:
            return ctx
    return flask_globals._cv_app.get(None)


def add_flask_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add ``flask_context`` (``{"kind", "id", "endpoint"}``) when a context is active."""
    try:
        ctx = _active_context()
        if ctx is None:
            return event_dict
        agent = _agent.current()
        shape = _SHAPE
        info: dict[str, Any] = {"kind": shape.kind(ctx)}
        if agent is not None:
            context_id = agent.ledger.context_id(ctx)
            if context_id is not None:
                info["id"] = context_id
        if info["kind"] == "request":
            endpoint = shape.endpoint(ctx)
            info["endpoint"] = safe_name(endpoint) if endpoint is not None else None
        event_dict["flask_context"] = info
    except Exception:
        pass
    return event_dict
