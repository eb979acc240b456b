"""Helpers for the tests: an event recorder, stack cleanup, site markers and test apps."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, abort
from flask import globals as flask_globals

from ctxtrace import _agent
from ctxtrace.pytest_plugin import EventLog


class Recorder(EventLog):
    """An emitter that keeps every event, for assertions: the pytest plugin's event log,
    telling pending accesses through whichever agent runs when a test asks."""

    name = "recorder"  # type: ignore[misc]

    def __init__(self) -> None:
        super().__init__()
        self.settle = _settle_running

    def names(self) -> list[str]:
        return [e.name for e in self.anomalies()]


def _settle_running() -> None:
    agent = _agent.current()
    if agent is not None:
        agent.ledger.settle_now()


def clear_flask_stacks() -> None:
    """Pop whatever a test left on this thread's Flask stacks (leak-on-purpose tests).

    Popping, not ``ContextVar.set(None)``: a ``None`` on the stack would break
    Flask's proxies for the rest of the process.
    """
    for name in ("_cv_request", "_cv_app"):
        var = getattr(flask_globals, name, None)
        for _ in range(100):
            ctx = None if var is None else var.get(None)
            if ctx is None:
                break
            try:
                ctx.pop()
            except Exception:
                if var.get(None) is ctx:
                    break


def line_of(path: str, marker: str) -> int:
    """The line of a ``# site: NAME`` marker, so tests can assert exact sites."""
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        if text.rstrip().endswith(f"# site: {marker}"):
            return number
    raise LookupError(marker)


def push_count(ctx: object) -> int:
    """Flask's own push count for a context, on either shape of Flask."""
    tokens = getattr(ctx, "_cv_tokens", None)
    if tokens is not None:
        return len(tokens)
    return int(getattr(ctx, "_push_count", 0)) if getattr(ctx, "_cv_token", None) else 0


def outcomes_app() -> Flask:
    """An app with a route per outcome a request can have, for the fault tests.

    They run it bare and instrumented and require the same answers: ``/ok`` (200),
    ``/missing`` (404) and ``/crash``, whose exception propagates to the client with a
    cause, so that the type, message and cause can all be compared.
    """
    app = Flask("faults")
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.route("/ok")
    def ok() -> str:
        return "fine"

    @app.route("/missing")
    def missing() -> str:
        abort(404)

    @app.route("/crash")
    def crash() -> str:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc

    return app


def add_wrong_pop_route(app: Flask) -> None:
    """``/wrong``: the view pops the outer of two app contexts first, one ``wrong_pop``.

    It answers ``wrong:refused`` or ``wrong:accepted``, as Flask took the pop. The view
    keeps the name ``wrong``: events name the function that pushed, and the load app
    tells its kinds of request apart by it.
    """

    @app.route("/wrong")
    def wrong() -> str:
        base = flask_globals._cv_app.get(None)
        outer, inner = app.app_context(), app.app_context()
        outer.push()
        inner.push()
        try:
            outer.pop()
        except (AssertionError, RuntimeError):
            _pop_down_to(base)
            return "wrong:refused"
        return "wrong:accepted"


def _pop_down_to(base: object) -> None:
    """Pop this thread's app contexts until ``base`` is on top again (Flask 3.2 keeps
    a refused context pushed; Flask <= 3.1 has already reset the stack)."""
    var = flask_globals._cv_app
    for _ in range(10):
        top = var.get(None)
        if top is None or top is base:
            return
        top.pop()
