"""Shared fixtures: an instrumented agent with an event recorder, and a clean-stack guard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from flask import Flask
from flask import globals as flask_globals

import ctxtrace
from ctxtrace import _agent, pytest_plugin

from ._support import Recorder, clear_flask_stacks


@pytest.fixture(autouse=True)
def no_context_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test that leaves a Flask context pushed, as Flask's own suite does."""
    yield
    leftover = [
        name
        for name in ("_cv_request", "_cv_app")
        if getattr(flask_globals, name, None) is not None
        and getattr(flask_globals, name).get(None) is not None
    ]
    clear_flask_stacks()
    if leftover and request.node.get_closest_marker("leaks_on_purpose") is None:
        pytest.fail(f"test left Flask contexts pushed: {leftover}")


def _stop_agent(*, even_the_plugins: bool) -> None:
    if ctxtrace.is_instrumented() and (
        even_the_plugins or not pytest_plugin.is_plugin_agent(_agent.current())
    ):
        ctxtrace.uninstrument()


@pytest.fixture(autouse=True)
def never_left_instrumented() -> Iterator[None]:
    """Each test starts and ends with ctxtrace off, or on only as the pytest plugin's guard."""
    _stop_agent(even_the_plugins=False)
    yield
    _stop_agent(even_the_plugins=False)


@pytest.fixture(autouse=True)
def guard_gives_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that turns ctxtrace on (with its own options) replaces the plugin's guard.

    With ``--ctxtrace`` the pytest plugin keeps an agent running; ctxtrace's own
    tests start theirs with ``instrument()`` or ``CtxTrace(app)``, which would
    otherwise find it and do nothing. The plugin does not judge such a test and
    starts its guard again for the next one.
    """
    start = _agent.start

    def start_over_the_guard(
        arguments: Mapping[str, object], app_config: Mapping[str, object] | None = None
    ) -> _agent.Agent | None:
        if pytest_plugin.is_plugin_agent(_agent.current()):
            _agent.stop()
        return start(arguments, app_config)

    monkeypatch.setattr(_agent, "start", start_over_the_guard)


@pytest.fixture
def no_agent() -> Iterator[None]:
    """ctxtrace off, the plugin's guard too, for a test that turns ctxtrace on itself.

    The plugin does not judge a test that takes ctxtrace over, and starts its
    agent again for the next one.
    """
    _stop_agent(even_the_plugins=True)
    yield
    _stop_agent(even_the_plugins=True)


@pytest.fixture
def instrumented(no_agent: None) -> Iterator[Any]:
    """A factory: ``recorder = instrumented(**options)`` turns ctxtrace on and records events."""
    agents: list[_agent.Agent] = []

    def start(**options: Any) -> Recorder:
        options.setdefault("log_rate_window", "off")
        # No Prometheus endpoint per test unless a test asks for one.
        options.setdefault("metrics", "none")
        assert ctxtrace.instrument(**options)
        agent = _agent.current()
        assert agent is not None
        recorder = Recorder()
        agent.subscribe(recorder)
        agents.append(agent)
        return recorder

    yield start
    for _ in agents:
        if ctxtrace.is_instrumented():
            ctxtrace.uninstrument()


@pytest.fixture
def agent_now() -> Any:
    """The running agent (after ``instrumented``)."""
    return _agent.current


@pytest.fixture
def app() -> Flask:
    """A small app with a healthy view and a view that uses ``g``."""
    app = Flask("shop")
    app.config["SECRET_KEY"] = "test"

    @app.route("/")
    def index() -> str:
        return "ok"

    return app
