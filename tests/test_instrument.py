"""Turning ctxtrace on and off: identity, idempotence, threads, the extension, precedence."""

from __future__ import annotations

import json
import threading
from typing import Any

import flask
import flask.ctx
import flask.globals
import pytest
from flask import Flask

import ctxtrace
from ctxtrace import CtxTrace, _agent

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
