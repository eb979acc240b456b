"""Canary tests that ci/flask_suite.py drops into a suite as ``tests/test_ctxtrace_canary.py``.

Flask's own suite never pops contexts in the wrong order, so it cannot show
that ctxtrace's ``wrong_pop`` detector is alive; these tests do it on purpose.
They run in the bare run too and must pass in both (they only use Flask), and
they leave the stacks as they found them, as the suite's own leak checks want.
Works on every shape of Flask: <= 3.1 resets the stack and then raises
``AssertionError``, the next release refuses the pop with ``RuntimeError``.
"""

from __future__ import annotations

import threading

import flask
import pytest
from flask import globals as flask_globals


def _clear_app_stack() -> None:
    var = flask_globals._cv_app
    for _ in range(10):
        ctx = var.get(None)
        if ctx is None:
            return
        ctx.pop()


def test_ctxtrace_canary_wrong_pop() -> None:
    """Popping the outer of two app contexts first is refused by Flask."""
    app = flask.Flask("ctxtrace_canary")
    outer, inner = app.app_context(), app.app_context()
    outer.push()
    inner.push()
    try:
        with pytest.raises((AssertionError, RuntimeError)):
            outer.pop()
    finally:
        _clear_app_stack()
    assert flask_globals._cv_app.get(None) is None


def test_ctxtrace_canary_thread_leak() -> None:
    """A thread that pushes and never pops ends with its context still pushed."""
    app = flask.Flask("ctxtrace_canary")
    seen: list[str] = []

    def work() -> None:
        app.app_context().push()
        seen.append(flask.current_app.name)

    # Not "ctxtrace-...": ctxtrace takes threads with that prefix for its own and
    # does not make them units of work.
    worker = threading.Thread(target=work, name="canary-leaker")
    worker.start()
    worker.join(10)
    assert seen == ["ctxtrace_canary"]
    assert flask_globals._cv_app.get(None) is None
