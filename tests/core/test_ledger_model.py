"""The ledger against a reference model, driven by random sequences on real Flask contexts.

The model below is written without looking at the ledger: a list per thread for
the stack, and the rules of the anomaly contract. Hypothesis drives pushes, pops
in any order, pops in the wrong thread, double pops, exceptions inside ``with``
blocks, out-of-context accesses, units of work and real requests through Flask's
WSGI entry (the dispatch path, with the contexts Flask pushes for a request) across
two real threads, and after every step the anomalies ctxtrace reported must be exactly the predicted
ones. A deliberately broken ledger must make the machine fail.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from flask import Flask, current_app
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import ctxtrace
from ctxtrace import _agent
from ctxtrace.core.flaskshape import detect
from ctxtrace.core.ledger import Ledger

from .._support import Recorder

MERGED = detect().merged
THREADS = 2


class Worker:
    """A real thread that runs closures on request, so each keeps its own Context."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self.results.put((True, job()))
            except BaseException as exc:
                self.results.put((False, exc))

    def run(self, job: Callable[[], Any]) -> tuple[bool, Any]:
        self.jobs.put(job)
        return self.results.get(timeout=10)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(10)


@dataclass
class Ctx:
    """The model's view of one context object."""

    label: int
    obj: Any
    thread: int | None = None
    count: int = 0
    flagged: bool = False
    orphan: bool = False
    untouchable: bool = False
    unit: int | None = None
    ledger_id: int | None = None


@dataclass
class Model:
    """Reference model: one list per thread, and the anomaly rules of the contract."""

    stacks: list[list[Ctx]] = field(default_factory=lambda: [[] for _ in range(THREADS)])
    units: list[int | None] = field(default_factory=lambda: [None] * THREADS)
    finished_units: set[int] = field(default_factory=set)
    next_unit: int = 1

    def push(self, c: Ctx, t: int) -> None:
        if c.count == 0:
            # A context pushed afresh is a new record: earlier reports do not carry over.
            c.thread, c.unit, c.flagged = t, self.units[t], False
            self.stacks[t].append(c)
        elif not MERGED:
            self.stacks[t].append(c)
        c.count += 1

    def pop(self, c: Ctx, t: int) -> list[tuple[str, int | None, int | None]]:
        if c.count == 0:
            return [("double_pop", None, None)]
        if c.thread != t:
            c.untouchable = True
            if c.flagged:
                return []
            c.flagged = True
            return [("foreign_pop", c.label, None)]
        stack = self.stacks[t]
        top = stack[-1]
        if top is c:
            c.count -= 1
            # Before the merge each push stacks; after it, the last pop unstacks.
            if not MERGED or c.count == 0:
                stack.pop()
            return []
        c.flagged = top.flagged = True
        if not MERGED:
            position = len(stack) - 1 - stack[::-1].index(c)
            for above in stack[position + 1 :]:
                above.orphan = above.untouchable = True
            del stack[position:]
            c.count -= 1
        return [("wrong_pop", c.label, top.label)]

    def begin_unit(self, t: int) -> tuple[int, list[tuple[str, int | None, int | None]]]:
        unit = self.next_unit
        self.next_unit += 1
        self.units[t] = unit
        stale = []
        for c in _distinct(self.stacks[t]):
            if c.unit in self.finished_units:
                stale.append(("stale_context", c.label, None))
        return unit, stale

    def end_unit(self, t: int) -> list[tuple[str, int | None, int | None]]:
        unit = self.units[t]
        assert unit is not None
        self.units[t] = None
        self.finished_units.add(unit)
        leaked = []
        for c in _distinct(self.stacks[t]):
            if c.unit == unit and not c.flagged:
                c.flagged = True
                leaked.append(("leaked", c.label, None))
        return leaked


def _distinct(stack: list[Ctx]) -> list[Ctx]:
    seen: list[Ctx] = []
    for c in stack:
        if all(c is not s for s in seen):
            seen.append(c)
    return seen


class LedgerMachine(RuleBasedStateMachine):
    """Random context traffic on real Flask, ctxtrace's reports against the model."""

    contexts = Bundle("contexts")
    #: Further ctxtrace options: ``spans="all"`` makes the ledger track a request's own
    #: contexts from their push (their lifecycle events feed the spans).
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.app = Flask("model")
        app = self.app

        @app.get("/")
        def plain() -> str:
            return current_app.name

        @app.get("/with")
        def balanced() -> str:
            with app.app_context():
                return current_app.name
        assert ctxtrace.instrument(
            sweep_interval=3600, log_rate_window="off", metrics="none", **self.options
        )
        agent = _agent.current()
        assert agent is not None
        self.agent = agent
        self.recorder = Recorder()
        agent.emitters = [self.recorder]
        self.workers = [Worker(f"model-{i}") for i in range(THREADS)]
        self.model = Model()
        self.labels = 0
        self.units_begun: list[Any] = [None] * THREADS
        self.all_contexts: list[Ctx] = []

    def teardown(self) -> None:
        for worker in self.workers:
            worker.stop()
        ctxtrace.uninstrument()

    def _run(self, t: int, job: Callable[[], Any]) -> tuple[bool, Any]:
        self.recorder.clear()
        return self.workers[t].run(job)

    def _check(self, predicted: list[tuple[str, int | None, int | None]]) -> None:
        by_id = {c.ledger_id: c.label for c in self.all_contexts if c.ledger_id is not None}
        seen = [
            (
                a.name,
                by_id.get(a.context.id) if a.context.id else None,
                by_id.get(a.other.id) if a.other is not None else None,
            )
            for a in self.recorder.anomalies()
        ]
        assert sorted(seen, key=repr) == sorted(predicted, key=repr)

    @rule(target=contexts)
    def new_context(self) -> Ctx:
        self.labels += 1
        c = Ctx(self.labels, self.app.app_context())
        self.all_contexts.append(c)
        return c

    @rule(c=contexts, t=st.integers(0, THREADS - 1))
    def push(self, c: Ctx, t: int) -> None:
        if c.untouchable or c.orphan:
            return
        if c.count and (c.thread != t or self.model.stacks[t][-1] is not c):
            return  # re-pushing is only modelled for the context on top of its own stack
        ok, _ = self._run(t, c.obj.push)
        assert ok
        self.model.push(c, t)
        c.ledger_id = self.agent.ledger.context_id(c.obj)
        self._check([])

    @rule(c=contexts, t=st.integers(0, THREADS - 1))
    def pop(self, c: Ctx, t: int) -> None:
        if c.untouchable or c.orphan:
            return
        if c.count and c.thread == t and c not in self.model.stacks[t]:
            return
        predicted = self.model.pop(c, t)
        self._run(t, c.obj.pop)
        self._check(predicted)

    @rule(target=contexts, t=st.integers(0, THREADS - 1))
    def pop_out_of_order(self, t: int) -> Any:
        """Two new contexts pushed on one thread, the lower popped first: the classic wrong pop.

        Random pushes and pops reach it too, but not reliably within the examples
        the machine runs; this keeps every run (and every mutant run) exercising it.
        """
        lower, upper = self.new_context(), self.new_context()
        self.push(lower, t)
        self.push(upper, t)
        self.pop(lower, t)
        return multiple(lower, upper)

    @rule(t=st.integers(0, THREADS - 1))
    def exception_inside_with(self, t: int) -> None:
        ctx = self.app.app_context()

        def job() -> None:
            with ctx:
                raise KeyError("inside")

        ok, exc = self._run(t, job)
        assert not ok and isinstance(exc, KeyError)
        self._check([])

    @rule(t=st.integers(0, THREADS - 1))
    def access(self, t: int) -> None:
        agent = self.agent

        def job() -> str:
            try:
                return current_app.name
            except RuntimeError as exc:
                # The worker's loop is the unit's boundary: the error escaped to it.
                agent.escaped(exc)
                raise

        ok, _ = self._run(t, job)
        empty = not self.model.stacks[t]
        assert ok != empty
        accesses = self.recorder.accesses()
        assert len(accesses) == (1 if empty else 0)
        self._check([])

    @precondition(lambda self: None in self.model.units)
    @rule(t=st.integers(0, THREADS - 1))
    def begin_unit(self, t: int) -> None:
        if self.model.units[t] is not None:
            return
        _, predicted = self.model.begin_unit(t)
        ledger = self.agent.ledger
        ok, result = self._run(t, lambda: ledger.begin_unit("task", "model"))
        assert ok
        self.units_begun[t] = result
        self._check(predicted)

    @rule(t=st.integers(0, THREADS - 1))
    def end_unit(self, t: int) -> None:
        if self.model.units[t] is None:
            return
        predicted = self.model.end_unit(t)
        unit = self.units_begun[t]
        hooks = self.agent.hooks
        ok, _ = self._run(t, lambda: hooks.end_unit(unit))
        assert ok
        self._check(predicted)

    @rule(t=st.integers(0, THREADS - 1), path=st.sampled_from(["/", "/with", "/missing"]))
    def request(self, t: int, path: str) -> None:
        """A request on a thread whatever its stack holds: a unit of its own, dispatched
        by Flask's contexts above the thread's, which must never be reported."""
        if self.model.units[t] is not None:
            return  # a request inside a task unit is another unit's dispatch
        _, predicted = self.model.begin_unit(t)
        predicted += self.model.end_unit(t)
        app = self.app
        ok, status = self._run(t, lambda: app.test_client().get(path).status_code)
        assert ok, status
        assert status == (404 if path == "/missing" else 200)
        self._check(predicted)

    @rule(target=contexts, t=st.integers(0, THREADS - 1))
    def leak_then_request(self, t: int) -> Any:
        """A task leaks a context and the next request on its thread inherits it: stale.

        Like ``pop_out_of_order``, so that every run reaches the dispatch path's stale
        check, not only the runs whose random steps happen to line it up.
        """
        if self.model.units[t] is not None:
            return multiple()
        leaked = self.new_context()
        self.begin_unit(t)
        self.push(leaked, t)
        self.end_unit(t)
        self.request(t, "/")
        return multiple(leaked)

    @invariant()
    def no_internal_errors(self) -> None:
        assert self.agent.errors.counts() == {}


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TrackedDispatchMachine(LedgerMachine):
    """The same traffic with every context tracked from its push (``CTXTRACE_SPANS=all``)."""

    options: ClassVar[dict[str, Any]] = {"spans": "all"}


@pytest.mark.parametrize("machine", [LedgerMachine, TrackedDispatchMachine])
@pytest.mark.usefixtures("no_agent")
def test_ledger_matches_the_model(machine: type[LedgerMachine]) -> None:
    """Every random sequence: ctxtrace reports exactly the anomalies the model predicts."""
    run_state_machine_as_test(machine, settings=SETTINGS)


@contextmanager
def _broken(monkeypatch: pytest.MonkeyPatch, name: str, replacement: Any) -> Iterator[None]:
    with monkeypatch.context() as patch:
        patch.setattr(Ledger, name, replacement)
        yield


@pytest.mark.parametrize(
    ("method", "mutant"),
    [
        # Mutation: wrong pops are always explained away, so never reported.
        ("_follows_earlier_mistake", staticmethod(lambda entry, culprit: True)),
        # Mutation: the end of a unit no longer reports what it left pushed.
        ("end_unit", lambda self, unit, repair=False: self.leave_unit(unit) or []),
        # Mutation: pops of contexts nobody tracks are ignored.
        ("_report_unknown_double_pop", lambda self, ctx, thread: None),
        # Mutation: a unit forgets to look for what earlier units left.
        ("check_stale", lambda self, unit: setattr(unit, "checked", True)),
        # Mutation: a request's own contexts are tracked like any push (its dispatch is lost).
        # Only Flask <= 3.1 asks (for the app context it pushes for a request): on the
        # merged Flask the mutant changes nothing, so it cannot be caught.
        pytest.param(
            "tracks_dispatch",
            property(lambda self: True),
            marks=pytest.mark.skipif(MERGED, reason="read only for Flask <= 3.1's app context"),
        ),
    ],
    ids=[
        "wrong_pop_silenced", "unit_end_blind", "double_pop_blind", "stale_blind",
        "dispatch_tracked",
    ],
)
@pytest.mark.usefixtures("no_agent")
def test_a_broken_ledger_fails_the_machine(
    monkeypatch: pytest.MonkeyPatch, method: str, mutant: Any
) -> None:
    """The machine can fail: a mutated ledger is caught."""
    with _broken(monkeypatch, method, mutant), pytest.raises(AssertionError):
        run_state_machine_as_test(LedgerMachine, settings=SETTINGS)
