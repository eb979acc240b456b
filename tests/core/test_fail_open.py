"""A fault inside ctxtrace never changes what the application sees."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask, current_app

import ctxtrace
from ctxtrace import _agent
from ctxtrace.core.ledger import Ledger

from .._support import outcomes_app


def _make_app(order: list[str]) -> Flask:
    """The fault tests' app, with teardown callbacks that note their order in `order`."""
    app = outcomes_app()

    @app.teardown_request
    def td_request(exc: BaseException | None) -> None:
        order.append(f"request:{type(exc).__name__ if exc else None}")

    @app.teardown_appcontext
    def td_app(exc: BaseException | None) -> None:
        order.append(f"app:{type(exc).__name__ if exc else None}")

    return app


def _observe() -> tuple[list[Any], list[str]]:
    order: list[str] = []
    app = _make_app(order)
    client = app.test_client()
    seen: list[Any] = []
    for path in ("/ok", "/missing"):
        response = client.get(path)
        seen.append((path, response.status_code, response.get_data()))
    with pytest.raises(ValueError) as info:
        client.get("/crash")
    exc = info.value
    seen.append(("crash", type(exc), str(exc), type(exc.__cause__), str(exc.__cause__)))
    with pytest.raises(RuntimeError) as outside:
        current_app.name  # noqa: B018 - the failed access is the point
    seen.append(("outside", type(outside.value), str(outside.value), outside.value.__cause__))
    # Contexts pushed by user code (tracked), and a pop Flask refuses (the careful path).
    with app.app_context():
        seen.append(("inside", current_app.name))
    ctx = app.app_context()
    ctx.push()
    ctx.pop()
    with pytest.raises(Exception) as double:  # whatever Flask raises, in both runs
        ctx.pop()
    # Flask's next release names the context in the message, with its id.
    seen.append(("double", type(double.value), re.sub(r"\d{6,}", "<id>", str(double.value))))
    return seen, order


_BUILT = ("push", "popped", "begin_request", "dispatch_pushed", "end_request")


def _explode(*args: Any, **kwargs: Any) -> None:
    raise ZeroDivisionError("fault injected into the ledger")


@pytest.mark.usefixtures("no_agent")
@pytest.mark.parametrize(
    "method",
    # What a request, a user's push and pop, a refused pop and a failed access call.
    [
        "begin_request", "dispatch_pushed", "end_request",
        "push", "popped", "pop", "access",
    ],
)
def test_fault_in_ledger_leaves_app_identical(
    method: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Responses, exceptions (type, message, cause) and teardown order match a bare run."""
    bare = _observe()
    # Patched before instrumenting: the hooks bind the ledger's methods once.
    name = method
    if name in _BUILT:
        # The hottest ones are closures each ledger builds for itself.
        monkeypatch.setattr(Ledger, f"_build_{name}", lambda self: _explode)
    else:
        monkeypatch.setattr(Ledger, name, _explode)
    assert ctxtrace.instrument(metrics="none")
    instrumented = _observe()
    assert instrumented == bare
    agent = _agent.current()
    assert agent is not None
    errors = agent.errors.counts()
    assert errors.get("hooks", 0) >= 1
    logged = [line for line in capsys.readouterr().err.splitlines() if "internal_error" in line]
    assert len(logged) == 1, "an internal error is logged once, then only counted"


def test_fault_in_an_emitter_is_counted_not_raised(app: Flask, instrumented: Any) -> None:
    """An emitter that raises on every event: the app is unaffected and it is counted."""
    instrumented(metrics="none")
    agent = _agent.current()
    assert agent is not None

    class Broken:
        name = "broken"

        def handle(self, event: object) -> None:
            raise OSError("disk full")

    agent.subscribe(Broken())
    for _ in range(3):
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018
    agent.ledger.settle_now()  # accesses outside any unit wait for the sweep
    assert agent.errors.counts() == {"broken": 3}
