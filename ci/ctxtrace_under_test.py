"""pytest plugin: run someone else's test suite with ctxtrace on, every event to a file.

Loaded by ``ci/flask_suite.py`` as ``-p ctxtrace_under_test`` (this folder on
``PYTHONPATH``) into Flask's or an extension's own test run. It turns ctxtrace
on process-wide before the first test, the way a production worker would: every
detector on, ``long_lived`` for app contexts too, no ``repair`` (the suite must
see exactly what Flask does), no metrics endpoint. Each event the agent emits
becomes one JSON line in the file named by ``UNDER_TEST_CTXTRACE_EVENTS``,
tagged with the test that was running; the last line is a summary of the
ledger's own counters, so the runner can tell a silent agent from a quiet suite.

It imports only ctxtrace and pytest: the suite under test must run as it would
without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Generator
from typing import IO, Any, Final

import pytest

import ctxtrace
from ctxtrace import _agent

#: Path of the JSON-lines file every event goes to (required). Not ``CTXTRACE_*``: ctxtrace
#: rejects unknown keys with that prefix.
ENV_EVENTS: Final = "UNDER_TEST_CTXTRACE_EVENTS"
#: Options for ``ctxtrace.instrument``: every detector on, app contexts too.
OPTIONS: Final = {
    "detect_leaked": True,
    "detect_long_lived": True,
    "detect_wrong_pop": True,
    "detect_double_pop": True,
    "detect_foreign_pop": True,
    "detect_stale_context": True,
    "detect_out_of_context_access": True,
    "long_lived_app": 2.0,
    "long_lived_request": 2.0,
    "repair": False,
    "metrics": "none",
    # Every tracked push and pop becomes an event and every request a span: the
    # most agent code on the suite's path.
    "spans": "all",
    # The runner attributes each out-of-context access to its test: each must be an
    # event, not a repeat counted inside the site's report window.
    "log_rate_window": "off",
}
_COLLECTING: Final = "<collection>"


def _plain(value: Any) -> Any:
    """An event as JSON-ready data; ``carry`` (an OpenTelemetry context) is left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != "carry"
        }
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


class EventFile:
    """An emitter writing each event as a JSON line, tagged with the running test."""

    name: Final = "under-test"

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.test = _COLLECTING
        self.written = 0

    def handle(self, event: Any) -> None:
        record = {
            "type": type(event).__name__,
            "test": self.test,
            "emitted_on": threading.current_thread().name,
            **_plain(event),
        }
        line = json.dumps(record, default=repr)
        with self._lock:
            self._out.write(line + "\n")
            self.written += 1

    def summary(self, agent: _agent.Agent) -> None:
        snapshot = agent.ledger.snapshot()
        record = {
            "type": "summary",
            "pushes": sum(s.pushes for s in snapshot),
            "pops": sum(s.pops for s in snapshot),
            "active": sum(s.active for s in snapshot),
            "by_kind": {
                kind: sum(s.pushes for s in snapshot if s.kind == kind)
                for kind in ("app", "request")
            },
            "dropped_contexts": agent.dropped()["context"],
            "internal_errors": agent.errors.counts(),
            "events": self.written,
            "flask_shape": "merged" if agent.shape.merged else "split",
        }
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()


_state: dict[str, Any] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get(ENV_EVENTS)
    if not path:
        raise pytest.UsageError(f"{ENV_EVENTS} must name the file for ctxtrace's events")
    if not ctxtrace.instrument(**OPTIONS):
        raise pytest.UsageError("ctxtrace.instrument() did not turn ctxtrace on")
    agent = _agent.current()
    assert agent is not None
    out = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in pytest_unconfigure
    writer = EventFile(out)
    agent.subscribe(writer)
    _state.update(agent=agent, writer=writer, out=out)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    writer: EventFile | None = _state.get("writer")
    if writer is not None:
        writer.test = item.nodeid
    try:
        return (yield)
    finally:
        agent: _agent.Agent | None = _state.get("agent")
        if agent is not None:
            # Accesses made outside any unit are told at the next sweep; the test has
            # ended, its errors are caught or gone: tell them now, as this test's.
            agent.ledger.settle_now()
        if writer is not None:
            writer.test = "<between tests>"


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    agent: _agent.Agent | None = _state.pop("agent", None)
    writer: EventFile | None = _state.pop("writer", None)
    out: IO[str] | None = _state.pop("out", None)
    if agent is None or writer is None or out is None:
        return
    writer.test = "<session end>"
    # One last round of what the watchdog does: contexts leaked and collected.
    agent.sweep()
    writer.summary(agent)
    ctxtrace.uninstrument()
    out.close()
