"""The structlog processor that adds the current Flask context to log lines."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from ctxtrace.processors import add_flask_context


def test_outside_any_context_adds_nothing() -> None:
    """No context: the event dict is returned unchanged."""
    assert add_flask_context(None, "info", {"event": "x"}) == {"event": "x"}


def test_request_context_adds_kind_endpoint_and_id(app: Flask, instrumented: Any) -> None:
    """Inside a request: kind, ctxtrace's context id and the endpoint, nothing else."""
    instrumented()
    seen: dict[str, Any] = {}

    @app.route("/items")
    def items() -> str:
        seen.update(add_flask_context(None, "info", {"event": "x"}))
        return "ok"

    app.test_client().get("/items?secret=1")
    context = seen["flask_context"]
    assert context["kind"] == "request"
    assert context["endpoint"] == "items"
    assert isinstance(context["id"], int)
    assert "secret" not in repr(seen)


@pytest.mark.usefixtures("no_agent")  # not even the pytest plugin's
def test_app_context_without_agent(app: Flask) -> None:
    """Without ctxtrace on, the kind is still added (no id)."""
    with app.app_context():
        event = add_flask_context(None, "info", {"event": "x"})
    assert event["flask_context"] == {"kind": "app"}
