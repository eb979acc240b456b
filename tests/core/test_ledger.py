"""Ledger behaviours not covered by the model: bounds, sweeps, repair, counts."""

from __future__ import annotations

import contextvars
import gc
import importlib
import runpy
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g

from ctxtrace import _agent
from ctxtrace.core.counters import read_count
from ctxtrace.core.flaskshape import detect

from .._support import Recorder, clear_flask_stacks


def _agent_now() -> _agent.Agent:
    agent = _agent.current()
    assert agent is not None
    return agent


def test_cap_turns_away_and_counts(app: Flask, instrumented: Any) -> None:
    """Beyond the cap no context is tracked; what was turned away is counted."""
    instrumented(ledger_cap=16)
    contexts = [app.app_context() for _ in range(20)]
    for ctx in contexts:
        ctx.push()
    ledger = _agent_now().ledger
    assert ledger.live_count() == 16
    assert read_count(ledger.dropped_contexts) == 4
    for ctx in reversed(contexts):
        ctx.pop()
    assert ledger.live_count() == 0


def test_long_lived_request_context_reported_once(app: Flask, instrumented: Any) -> None:
    """A request context older than the limit is reported by the sweep, once."""
    recorder = instrumented(long_lived_request=0.01)
    with app.test_request_context("/"):
        time.sleep(0.03)
        _agent_now().sweep()
        _agent_now().sweep()
    assert recorder.names() == ["long_lived"]
    assert recorder.anomalies()[0].context.kind == "request"


def test_app_contexts_are_not_long_lived_by_default(app: Flask, instrumented: Any) -> None:
    """App contexts are held legitimately by CLI commands and workers."""
    recorder = instrumented(long_lived_request=0.01)
    with app.app_context():
        time.sleep(0.03)
        _agent_now().sweep()
    assert recorder.names() == []


def test_leak_found_when_context_is_collected(app: Flask, instrumented: Any) -> None:
    """A context left pushed in a Context that is thrown away is leaked (collected)."""
    recorder = instrumented()
    contextvars.copy_context().run(lambda: app.app_context().push())
    gc.collect()
    _agent_now().sweep()
    [leak] = recorder.anomalies()
    assert (leak.name, leak.reason) == ("leaked", "collected")
    assert _agent_now().ledger.live_count() == 0


@pytest.mark.leaks_on_purpose
def test_leak_found_at_process_exit(app: Flask, instrumented: Any) -> None:
    """Whatever is still pushed at exit is leaked (reason exit)."""
    recorder = instrumented()
    app.app_context().push()
    _agent_now().ledger.finish_all()
    assert [(a.name, a.reason) for a in recorder.anomalies()] == [("leaked", "exit")]
    clear_flask_stacks()


def test_foreign_pop_in_another_thread(app: Flask, instrumented: Any) -> None:
    """Popping in a thread other than the pusher's is foreign_pop, with both thread names."""
    recorder = instrumented()
    ctx = app.app_context()
    ctx.push()
    errors: list[BaseException] = []

    def pop_elsewhere() -> None:
        try:
            ctx.pop()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=pop_elsewhere, name="elsewhere")
    worker.start()
    worker.join()
    [foreign] = recorder.anomalies()
    assert foreign.name == "foreign_pop"
    assert foreign.thread_name == "elsewhere"
    assert foreign.context.thread_name == threading.current_thread().name
    assert errors, "Flask itself refuses a pop from another thread"
    clear_flask_stacks()


def test_double_pop(app: Flask, instrumented: Any) -> None:
    """Popping a context that is no longer pushed is double_pop."""
    recorder = instrumented()
    ctx = app.app_context()
    ctx.push()
    ctx.pop()
    with pytest.raises((IndexError, LookupError, RuntimeError)):
        ctx.pop()
    assert recorder.names() == ["double_pop"]


class AuditMiddleware:
    """Pushes an app context around the app and forgets to pop it."""

    def __init__(self, app: Flask) -> None:
        self.app, self.inner = app, app.wsgi_app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        self.app.app_context().push()
        return self.inner(environ, start_response)


def test_repair_pops_the_leak_and_runs_teardown(app: Flask, instrumented: Any) -> None:
    """With repair on, the leaked context is popped at unit end: the next request is clean."""
    recorder = instrumented(repair=True)
    torn_down: list[str] = []
    app.teardown_appcontext(lambda exc: torn_down.append("down"))

    @app.route("/mark")
    def mark() -> str:
        seen = g.get("marker", "clean")
        g.marker = "stale"
        return str(seen)

    app.wsgi_app = AuditMiddleware(app)  # type: ignore[method-assign]
    client = app.test_client()
    assert client.get("/mark").get_data(as_text=True) == "clean"
    assert client.get("/mark").get_data(as_text=True) == "clean"
    leaks = recorder.anomalies("leaked")
    assert len(leaks) == 2 and all(a.repaired for a in leaks)
    assert recorder.anomalies("stale_context") == []
    assert "down" in torn_down


def test_counts_and_durations(app: Flask, instrumented: Any) -> None:
    """Exact push/pop counts per kind and app, and one lifetime per finished context."""
    instrumented()
    client = app.test_client()
    for _ in range(5):
        client.get("/")
    with app.app_context():
        pass
    ledger = _agent_now().ledger
    counts = {(s.kind, s.app): (s.pushes, s.pops, s.active) for s in ledger.snapshot()}
    # Before the merge, each request also pushes an app context of its own.
    app_pushes = 1 if detect().merged else 6
    assert counts == {("app", "shop"): (app_pushes,) * 2 + (0,), ("request", "shop"): (5, 5, 0)}
    durations = list(ledger.drain_durations())
    assert len(durations) == sum(v[1] for v in counts.values())
    assert all(d >= 0 for _, _, d in durations)


# -- a context a module pushes while it is imported ---------------------------------

TUTORIAL_MODULE = '''\
from flask import Flask

app = Flask("imported")
app.app_context().push()


def name():
    from flask import current_app
    return current_app.name
'''


@pytest.fixture
def tutorial_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of a fresh name whose body pushes an app context (line 4), importable."""
    name = f"tutorial_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(TUTORIAL_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _pushed_at_import(recorder: Any) -> list[tuple[str, str, int]]:
    return [
        (a.name, a.reason, a.context.site.line if a.context.site else 0)
        for a in recorder.anomalies()
    ]


@pytest.mark.leaks_on_purpose
def test_module_pushing_at_import_in_a_unit_is_said_once(
    instrumented: Any, tutorial_module: str
) -> None:
    """Imported by the first of several units (an RQ SimpleWorker's first job): not leaked
    at its end, not stale for the next ones, one long_lived (import) at the module's line;
    repair leaves it alone, as later users rely on it."""
    recorder = instrumented(repair=True)
    agent = _agent_now()
    names = []
    for n in range(3):
        handle = agent.begin_unit("job", f"job{n}")
        names.append(importlib.import_module(tutorial_module).name())
        agent.end_unit(handle)
    agent.sweep()
    agent.ledger.finish_all()
    assert names == ["imported"] * 3
    assert _pushed_at_import(recorder) == [("long_lived", "import", 4)]
    [said] = recorder.anomalies()
    assert said.context.unit is not None and said.context.unit.name == "job0"
    clear_flask_stacks()


@pytest.mark.leaks_on_purpose
def test_module_pushing_at_import_outside_units_is_said_at_the_sweep(
    instrumented: Any, tutorial_module: str
) -> None:
    """Imported at start-up (a --preload master): said by the first sweep, not at exit."""
    recorder = instrumented()
    importlib.import_module(tutorial_module)
    agent = _agent_now()
    assert recorder.anomalies() == []
    agent.sweep()
    assert _pushed_at_import(recorder) == [("long_lived", "import", 4)]
    agent.sweep()
    agent.ledger.finish_all()
    assert len(recorder.anomalies()) == 1
    clear_flask_stacks()


@pytest.mark.leaks_on_purpose
def test_module_pushing_at_import_is_said_at_exit_without_a_sweep(
    instrumented: Any, tutorial_module: str
) -> None:
    """A process that ends before any sweep (a short script) says it at exit, as import."""
    recorder = instrumented()
    importlib.import_module(tutorial_module)
    _agent_now().ledger.finish_all()
    assert _pushed_at_import(recorder) == [("long_lived", "import", 4)]
    clear_flask_stacks()


def test_script_body_pushing_is_still_a_leak(instrumented: Any, tmp_path: Any) -> None:
    """The same lines run as a script (not imported): the unit that ran them leaked it."""
    recorder = instrumented(repair=True)
    script = tmp_path / "script.py"
    script.write_text(TUTORIAL_MODULE, encoding="utf-8")
    agent = _agent_now()
    handle = agent.begin_unit("command", "script")
    runpy.run_path(str(script))
    agent.end_unit(handle)
    assert [(a.name, a.reason) for a in recorder.anomalies()] == [("leaked", "unit_end")]


def test_module_whose_import_failed_leaked_its_push(
    instrumented: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module body that pushes and then raises is gone from sys.modules: nobody relies
    on its context, and the unit that imported it leaked it."""
    recorder = instrumented(repair=True)
    name = f"broken_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(TUTORIAL_MODULE + "raise ImportError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = _agent_now()
    handle = agent.begin_unit("job", "imports")
    with pytest.raises(ImportError):
        importlib.import_module(name)
    agent.end_unit(handle)
    assert [(a.name, a.reason) for a in recorder.anomalies()] == [("leaked", "unit_end")]


@pytest.mark.leaks_on_purpose
def test_a_context_popped_while_the_sweep_reports_is_not_leaked(
    instrumented: Any, app: Flask
) -> None:
    """The sweep walks a snapshot and its reports may let other threads (greenlets) run:
    a context popped and freed meanwhile is finished, not ``leaked`` (``collected``)."""
    recorder = instrumented()
    # Pushed in a Context that is then dropped: freed while pushed, found by the sweep.
    contextvars.Context().run(app.app_context().push)
    gc.collect()
    held = [app.app_context()]
    held[0].push()

    class PopsDuringTheReport(Recorder):
        def handle(self, event: Any) -> None:
            super().handle(event)
            if held:
                held.pop().pop()
                gc.collect()

    agent = _agent.current()
    assert agent is not None
    popper = PopsDuringTheReport()
    agent.subscribe(popper)
    agent.sweep()
    assert [(a.name, a.reason) for a in recorder.anomalies()] == [("leaked", "collected")]
