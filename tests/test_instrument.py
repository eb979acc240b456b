"""Turning ctxtrace on and off: identity, idempotence, threads, the extension, precedence,
and switching it while requests are in flight."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from typing import Any

import flask
import flask.ctx
import flask.globals
import pytest
from flask import Flask

import ctxtrace
from ctxtrace import CtxTrace, _agent
from ctxtrace.core import flaskshape

from ._servers import join_threads, wait_for_request_threads, werkzeug_server
from ._support import Recorder

# These tests turn ctxtrace on and off themselves (the pytest plugin's guard stands aside).
pytestmark = pytest.mark.usefixtures("no_agent")


def _originals() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for cls in (flask.ctx.AppContext, vars(flask.ctx).get("RequestContext")):
        if cls is not None:
            for name in ("push", "pop"):
                found[f"{cls.__name__}.{name}"] = vars(cls)[name]
    for name in ("__call__", "wsgi_app"):
        found[f"Flask.{name}"] = vars(flask.Flask)[name]
    for name in ("current_app", "g", "request", "session", "app_ctx", "request_ctx"):
        proxy = vars(flask.globals).get(name)
        if proxy is not None:
            found[name] = object.__getattribute__(proxy, "_get_current_object")
    return found


def test_uninstrument_restores_identical_objects() -> None:
    """Every patched attribute is the very same object again after uninstrument."""
    before = _originals()
    assert ctxtrace.instrument()
    during = _originals()
    assert all(during[k] is not before[k] for k in before)
    assert ctxtrace.uninstrument()
    after = _originals()
    assert all(after[k] is before[k] for k in before)


def test_cycles_and_repeated_calls(capsys: pytest.CaptureFixture[str]) -> None:
    """on, on, off, off, on: cycles work and each repeated call logs one line."""
    assert ctxtrace.instrument()
    assert not ctxtrace.instrument()
    assert ctxtrace.uninstrument()
    assert not ctxtrace.uninstrument()
    assert ctxtrace.instrument()
    assert ctxtrace.is_instrumented()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("ctxtrace.already_instrumented") == 1
    assert events.count("ctxtrace.not_instrumented") == 1


def test_a_wrapper_added_on_top_is_not_unpicked() -> None:
    """Another tool's wrapper over ours stays; ours inside it becomes a pass-through."""
    assert ctxtrace.instrument()
    ours = vars(flask.ctx.AppContext)["push"]
    calls: list[str] = []

    def theirs(self: Any) -> None:
        calls.append("theirs")
        ours(self)

    flask.ctx.AppContext.push = theirs  # type: ignore[method-assign]
    try:
        ctxtrace.uninstrument()
        assert vars(flask.ctx.AppContext)["push"] is theirs
        app = Flask("stack")
        with app.app_context():
            assert flask.current_app.name == "stack"
        assert calls == ["theirs"]
    finally:
        flask.ctx.AppContext.push = ours.__wrapped__  # type: ignore[method-assign, attr-defined]


def test_concurrent_instrument_and_uninstrument() -> None:
    """Many threads racing to turn it on and off leave exactly one consistent state."""
    before = _originals()
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def flip(on: bool) -> None:
        barrier.wait()
        results.append(ctxtrace.instrument() if on else ctxtrace.uninstrument())

    threads = [threading.Thread(target=flip, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctxtrace.uninstrument()
    assert _originals() == before
    assert sum(results) >= 1


def test_extension_reads_app_config(instrumented: Any) -> None:
    """``CtxTrace(app)`` reads CTXTRACE_* keys from app.config."""
    app = Flask("ext")
    app.config["CTXTRACE_FLIGHT_RECORD"] = 3
    ext = CtxTrace(app)
    assert app.extensions["ctxtrace"] is ext
    agent = _agent.current()
    assert agent is not None
    assert agent.config.flight_record == 3
    assert agent.config.sources["flight_record"] == "app.config"


def test_extension_init_app_with_factory() -> None:
    """``CtxTrace().init_app(app)`` in an app factory; arguments beat app.config."""
    ext = CtxTrace(flight_record=2)
    app = Flask("factory")
    app.config["CTXTRACE_FLIGHT_RECORD"] = 5
    ext.init_app(app)
    assert ext.agent is not None
    assert ext.agent.config.flight_record == 2


def test_precedence_argument_app_config_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """argument > app.config > environment > default, key by key."""
    monkeypatch.setenv("CTXTRACE_FLIGHT_RECORD", "7")
    monkeypatch.setenv("CTXTRACE_LEDGER_CAP", "500")
    monkeypatch.setenv("CTXTRACE_REPAIR", "true")
    app = Flask("prec")
    app.config.update(CTXTRACE_FLIGHT_RECORD=6, CTXTRACE_LEDGER_CAP=400)
    CtxTrace(app, flight_record=5)
    agent = _agent.current()
    assert agent is not None
    config = agent.config
    assert (config.flight_record, config.ledger_cap, config.repair) == (5, 400, True)
    assert config.long_lived_request == 30.0


def test_bad_value_in_code_raises_and_leaves_nothing_on() -> None:
    """A bad argument raises ConfigError naming key, value and what is allowed."""
    before = _originals()
    with pytest.raises(ctxtrace.ConfigError) as info:
        ctxtrace.instrument(ledger_cap=-1)
    message = str(info.value)
    assert "CTXTRACE_LEDGER_CAP" in message and "-1" in message and "16..10000000" in message
    assert not ctxtrace.is_instrumented()
    assert _originals() == before


def test_bad_value_in_app_config_raises() -> None:
    """A bad app.config value raises too (it was written in code)."""
    app = Flask("bad")
    app.config["CTXTRACE_SPANS"] = "some"
    with pytest.raises(ctxtrace.ConfigError, match="all, anomalies or off"):
        CtxTrace(app)
    assert not ctxtrace.is_instrumented()


def test_bad_environment_value_logs_once_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad CTXTRACE_* variable: one log line, agent off, the app still runs."""
    monkeypatch.setenv("CTXTRACE_SWEEP_INTERVAL", "soon")
    before = _originals()
    assert not ctxtrace.instrument()
    assert _originals() == before
    [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert line["event"] == "ctxtrace.config_error"
    assert line["key"] == "CTXTRACE_SWEEP_INTERVAL"
    assert line["value"] == "'soon'"
    app = Flask("runs")
    with app.app_context():
        assert flask.current_app.name == "runs"


def test_disabled_switch_leaves_flask_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTXTRACE_ENABLED=false: nothing is patched."""
    monkeypatch.setenv("CTXTRACE_ENABLED", "false")
    before = _originals()
    assert not ctxtrace.instrument()
    assert _originals() == before


def test_suppressed_sites_are_not_reported(app: Flask, instrumented: Any) -> None:
    """A module listed in ``suppress`` is known and accepted."""
    recorder: Recorder = instrumented(suppress=[__name__])
    with pytest.raises(RuntimeError):
        flask.current_app.config  # noqa: B018 - the access is the point
    assert recorder.accesses() == []


# -- switching while requests are in flight ----------------------------------

#: Requests through a real threaded server, and plain threads, held mid-context.
IN_FLIGHT_REQUESTS = 4
IN_FLIGHT_THREADS = 2
#: Flask <= 3.1 pushes an app context of its own under every request context; in its
#: next release the request's context is itself the app context.
OWN_APP_CONTEXTS = 0 if flaskshape.detect().merged else 1
#: Every wait of these tests is bounded by this.
WAIT_S = 10.0


def _flask_stacks() -> list[object]:
    """What is on this thread's Flask stacks (nothing, when every push was popped)."""
    tops = []
    for name in ("_cv_request", "_cv_app"):
        var = vars(flask.globals).get(name)
        if var is not None and var.get(None) is not None:
            tops.append(var.get(None))
    return tops


class _Held:
    """An app whose requests, and plain threads, wait mid-context until released.

    A request ``/wait/N`` sets ``g.n`` in its own app context, then pushes a second
    app context with ``with`` and waits inside it: its contexts are pushed before
    the switch and popped after it. Then it pushes and pops a third, after the
    switch, on top of its own. Its body, ``"N N /wait/N"``, is read after those
    pops, so a pop that did not happen would show in it. A plain thread pushes a
    test request context (with the app context Flask pushes for it) and pops it
    after the wait. Each records what is left on its Flask stacks at its end, and
    every teardown function counts its calls.
    """

    def __init__(self) -> None:
        self.app = Flask("inflight")
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.teardowns: list[str] = []
        self.stacks_at_end: list[list[object]] = []
        self.seen: list[str] = []
        self.errors: list[BaseException] = []
        app = self.app

        @app.teardown_request
        def request_torn_down(exc: BaseException | None) -> None:
            self.teardowns.append("request")

        @app.teardown_appcontext
        def app_torn_down(exc: BaseException | None) -> None:
            self.teardowns.append("app")

        @app.route("/wait/<int:n>")
        def wait(n: int) -> str:
            flask.g.n = n
            with app.app_context():
                flask.g.n = -1
                self.entered.release()
                self.gate.wait(WAIT_S)
            with app.app_context():
                flask.g.n = -2
            return f"{n} {flask.g.n} {flask.request.path}"

    def wsgi(self, environ: Any, start_response: Any) -> Any:
        """The app as the server calls it, noting the stacks once the request is done."""
        try:
            return self.app(environ, start_response)
        finally:
            self.stacks_at_end.append(_flask_stacks())

    def hold(self, n: int) -> None:
        """A plain thread: a request context pushed by hand, held, popped."""
        try:
            ctx = self.app.test_request_context(f"/held/{n}")
            ctx.push()
            self.entered.release()
            self.gate.wait(WAIT_S)
            self.seen.append(flask.request.path)
            ctx.pop()
            self.stacks_at_end.append(_flask_stacks())
        except BaseException as exc:  # reported in the test's thread
            self.errors.append(exc)

    def start(self, port: int) -> tuple[list[threading.Thread], list[tuple[int, int, str]]]:
        """Send the requests and start the threads; return once every one is held."""
        results: list[tuple[int, int, str]] = []

        def client(n: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
            try:
                connection.request("GET", f"/wait/{n}")
                response = connection.getresponse()
                results.append((n, response.status, response.read().decode()))
            except BaseException as exc:  # reported in the test's thread
                self.errors.append(exc)
            finally:
                connection.close()

        threads = [
            threading.Thread(target=client, args=(n,), name=f"inflight-client-{n}")
            for n in range(IN_FLIGHT_REQUESTS)
        ] + [
            threading.Thread(target=self.hold, args=(n,), name=f"inflight-holder-{n}")
            for n in range(IN_FLIGHT_THREADS)
        ]
        for thread in threads:
            thread.start()
        for _ in threads:
            assert self.entered.acquire(timeout=WAIT_S), "a request never reached its wait"
        return threads, results

    def release(self, threads: list[threading.Thread], results: list[tuple[int, int, str]]) -> None:
        """Let everything finish, then check it went exactly as it does without ctxtrace."""
        self.gate.set()
        join_threads(threads, timeout=WAIT_S, what="released clients and threads")
        wait_for_request_threads(WAIT_S)
        assert self.errors == []
        assert sorted(results) == [
            (n, 200, f"{n} {n} /wait/{n}") for n in range(IN_FLIGHT_REQUESTS)
        ]
        assert sorted(self.seen) == [f"/held/{n}" for n in range(IN_FLIGHT_THREADS)]
        assert self.stacks_at_end == [[]] * (IN_FLIGHT_REQUESTS + IN_FLIGHT_THREADS)
        # Per request: its own teardown, its app context's and the two inner ones';
        # per thread: the request context's and its app context's.
        assert sorted(self.teardowns) == sorted(
            ["request"] * (IN_FLIGHT_REQUESTS + IN_FLIGHT_THREADS)
            + ["app"] * (3 * IN_FLIGHT_REQUESTS + IN_FLIGHT_THREADS)
        )

    def run_clean(self, port: int) -> None:
        """The same traffic again, nothing held (the gate stays open)."""
        self.teardowns.clear()
        self.stacks_at_end.clear()
        self.seen.clear()
        self.release(*self.start(port))


def _check_clean_round(recorder: Recorder, agent: _agent.Agent, earlier_apps: int) -> None:
    """A round run wholly under ``agent``: no anomaly, and exactly its pushes and pops,
    plus ``earlier_apps`` app contexts pushed and popped under it in the held round."""
    agent.sweep()
    assert recorder.anomalies() == [] and recorder.accesses() == []
    counts = {
        (s.kind, s.pushes, s.pops, s.active) for s in agent.ledger.snapshot() if s.app == "inflight"
    }
    requests = IN_FLIGHT_REQUESTS + IN_FLIGHT_THREADS
    apps = (2 + OWN_APP_CONTEXTS) * IN_FLIGHT_REQUESTS + OWN_APP_CONTEXTS * IN_FLIGHT_THREADS
    apps += earlier_apps
    assert counts == {("request", requests, requests, 0), ("app", apps, apps, 0)}
    assert agent.ledger.live_count() == 0
    assert agent.errors.counts() == {}


@pytest.mark.parametrize("switch_on_again", [False, True], ids=["off", "off-then-on"])
def test_uninstrument_while_requests_are_in_flight(
    instrumented: Callable[..., Recorder], switch_on_again: bool
) -> None:
    """Hooks taken off mid-request: same answers, every pop and teardown, nothing reported."""
    held = _Held()
    before = instrumented()
    stopped = _agent.current()
    assert stopped is not None
    with werkzeug_server(held.wsgi, timeout=WAIT_S) as port:
        threads, results = held.start(port)
        assert ctxtrace.uninstrument()
        # Optionally on again before the held contexts are popped: the new agent
        # never saw their pushes, and must not take their pops for mistakes.
        after = instrumented() if switch_on_again else None
        held.release(threads, results)
        stopped.sweep()
        # The stopped agent saw the pushes but not the pops, and says nothing of them.
        assert before.anomalies() == [] and before.accesses() == []
        assert stopped.errors.counts() == {}
        if after is None:
            after = instrumented()
        else:
            assert after.anomalies() == []
        after.clear()
        agent = _agent.current()
        assert agent is not None and agent is not stopped
        held.run_clean(port)
    # Turned on before the release, it saw (only) the app contexts pushed after it.
    _check_clean_round(after, agent, IN_FLIGHT_REQUESTS if switch_on_again else 0)


def test_instrument_while_requests_are_in_flight(instrumented: Callable[..., Recorder]) -> None:
    """Contexts pushed before instrument() and popped after it: no anomaly, not counted."""
    held = _Held()
    assert not ctxtrace.is_instrumented()
    with werkzeug_server(held.wsgi, timeout=WAIT_S) as port:
        threads, results = held.start(port)
        recorder = instrumented()
        agent = _agent.current()
        assert agent is not None
        held.release(threads, results)
        agent.sweep()
        assert recorder.anomalies() == [] and recorder.accesses() == []
        # Pops of contexts it never saw pushed are no news to the ledger; it counts
        # the one app context each request pushed after it, on top of those.
        counts = {
            (s.kind, s.pushes, s.pops) for s in agent.ledger.snapshot() if s.app == "inflight"
        }
        assert counts == {("app", IN_FLIGHT_REQUESTS, IN_FLIGHT_REQUESTS)}
        held.run_clean(port)
    _check_clean_round(recorder, agent, IN_FLIGHT_REQUESTS)
