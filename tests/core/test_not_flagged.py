"""Correct Flask usage that ctxtrace must stay silent about."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import click
import pytest
from flask import (
    Flask,
    copy_current_request_context,
    current_app,
    g,
    request,
    stream_with_context,
)
from flask.cli import FlaskGroup, with_appcontext
from werkzeug.debug import DebuggedApplication
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from ctxtrace import _agent

from .._support import Recorder


def _silent(recorder: Recorder) -> None:
    agent = _agent.current()
    assert agent is not None
    agent.sweep()
    assert recorder.anomalies() == []
    assert recorder.accesses() == []
    assert agent.errors.counts() == {}


def test_nested_app_contexts(app: Flask, instrumented: Any) -> None:
    """Nested ``with app.app_context()`` blocks, including the same app twice."""
    recorder = instrumented()
    with app.app_context(), app.app_context():
        assert current_app.name == "shop"
    _silent(recorder)


def test_test_client_preserved_contexts(app: Flask, instrumented: Any) -> None:
    """``with client:`` keeps the last request's context after the request ends."""
    recorder = instrumented()

    @app.route("/who")
    def who() -> str:
        g.user = "u1"
        return "ok"

    with app.test_client() as client:
        client.get("/who")
        assert request.path == "/who"
        assert g.user == "u1"
        client.get("/who?again=1")
        assert request.args["again"] == "1"
    _silent(recorder)


def test_test_request_context(app: Flask, instrumented: Any) -> None:
    """``app.test_request_context()`` as a ``with`` block."""
    recorder = instrumented()
    with app.test_request_context("/items?x=1"):
        assert request.args["x"] == "1"
    _silent(recorder)


def test_stream_with_context(app: Flask, instrumented: Any) -> None:
    """A streamed response keeps its context until the stream ends."""
    recorder = instrumented()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[str]:
            yield request.path
            yield "-done"

        return stream_with_context(chunks())

    response = app.test_client().get("/stream")
    assert response.get_data(as_text=True) == "/stream-done"
    _silent(recorder)


def test_copy_current_request_context_in_a_thread(app: Flask, instrumented: Any) -> None:
    """A thread that runs a copied request context and finishes normally."""
    recorder = instrumented()
    seen: list[str] = []

    @app.route("/copy")
    def copy() -> str:
        @copy_current_request_context
        def work() -> None:
            seen.append(request.path)

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        return "ok"

    assert app.test_client().get("/copy").status_code == 200
    assert seen == ["/copy"]
    _silent(recorder)


def test_async_view(app: Flask, instrumented: Any) -> None:
    """An ``async def`` view run through asgiref."""
    pytest.importorskip("asgiref")
    recorder = instrumented()

    @app.route("/async")
    async def slow() -> str:
        return str(current_app.name)

    assert app.test_client().get("/async").get_data(as_text=True) == "shop"
    _silent(recorder)


def test_request_served_in_a_context_copied_from_a_running_request(
    app: Flask, instrumented: Any
) -> None:
    """A view hands its Context to a thread that serves another request in it, and
    finishes while that request still runs: each thread keeps its own running unit
    (the copied Context holds the first thread's unit slot, which the second thread
    must not take over)."""
    recorder = instrumented()
    entered, release = threading.Event(), threading.Event()
    served: list[str] = []
    workers: list[threading.Thread] = []

    @app.route("/inner")
    def inner() -> str:
        entered.set()
        release.wait(10)
        return "inner"

    def serve_inner(copied: contextvars.Context) -> None:
        served.append(copied.run(lambda: app.test_client().get("/inner").get_data(as_text=True)))

    @app.route("/outer")
    def outer() -> str:
        workers.append(threading.Thread(target=serve_inner, args=(contextvars.copy_context(),)))
        workers[-1].start()
        assert entered.wait(10)
        with app.app_context():  # a push of this request's own while the other runs
            pass
        return "outer"

    for _ in range(3):
        entered.clear()
        release.clear()
        assert app.test_client().get("/outer").get_data(as_text=True) == "outer"
        release.set()
        workers[-1].join(10)
    assert served == ["inner"] * 3
    _silent(recorder)
    agent = _agent.current()
    assert agent is not None and agent.current_unit() is None
    assert agent.ledger.live_count() == 0


def test_two_apps_behind_dispatcher_middleware(app: Flask, instrumented: Any) -> None:
    """Two apps in one process, mounted with DispatcherMiddleware."""
    recorder = instrumented()
    admin = Flask("admin")

    @admin.route("/")
    def admin_index() -> str:
        return str(current_app.name)

    combined = DispatcherMiddleware(app, {"/admin": admin})
    client = Client(combined)
    assert client.get("/admin/").get_data(as_text=True) == "admin"
    assert client.get("/").get_data(as_text=True) == "ok"
    _silent(recorder)


def test_interactive_debugger(app: Flask, instrumented: Any) -> None:
    """The debugger keeps a failing request's contexts and re-enters them to evaluate code."""
    recorder = instrumented()

    @app.route("/boom")
    def boom() -> str:
        raise ZeroDivisionError

    app.debug = True
    debugged = DebuggedApplication(app, evalex=True)
    response = Client(debugged).get("/boom")
    assert response.status_code == 500
    preserved = [cm for contexts in debugged.frame_contexts.values() for cm in contexts]
    assert preserved, "the debugger kept no contexts: the test would prove nothing"
    for cm in preserved[:2]:
        with cm:
            assert current_app.name == "shop"
    _silent(recorder)


def test_flask_cli_commands(app: Flask, instrumented: Any) -> None:
    """``flask`` CLI commands with and without ``with_appcontext`` that touch nothing."""
    recorder = instrumented()

    @app.cli.command("with-context")
    def with_context() -> None:
        click.echo(current_app.name)

    @click.command("plain")
    def plain() -> None:
        click.echo("plain")

    @click.command("explicit")
    @with_appcontext
    def explicit() -> None:
        click.echo(current_app.name)

    app.cli.add_command(plain)
    app.cli.add_command(explicit)
    runner = app.test_cli_runner()
    for name in ("with-context", "plain", "explicit"):
        result = runner.invoke(args=[name])
        assert result.exit_code == 0, result.output
    group = FlaskGroup(create_app=lambda: app)
    result = runner.invoke(group, ["plain"])
    assert result.exit_code == 0, result.output
    _silent(recorder)
