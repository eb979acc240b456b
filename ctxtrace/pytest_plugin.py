"""pytest plugin: a test that leaks a Flask context or reads a proxy with no context fails.

Registered through the ``pytest11`` entry point, and inert unless asked for with
``--ctxtrace`` or the ini option ``ctxtrace = true``: installing ctxtrace never
changes a test run by surprise.

When active, each test is a unit of work of the running agent (the plugin
starts one if the suite did not), from its first function-scoped fixture to the
end of its teardown. An out-of-context access fails the phase it happened in; a
context pushed during the test and still pushed when it ends, in the test's
thread or in a thread it started, fails it too: at teardown, which pytest shows
as an error. Each message names the anomaly and the site (``file:line``). What
the test pushed and left on its thread's stacks is popped after it, so the next
test starts with what this one found.

A context that a fixture of a wider scope (class, module, package, session, and
unittest's ``setUpClass``/``setUpModule``, which pytest runs as such fixtures)
pushed is that fixture's while it lives: never a test's leak, never popped by
the plugin. Only if it is still pushed after the fixture's own teardown has it
outlived its owner: then the test whose teardown ran it errors, and the plugin
pops it.

``@pytest.mark.ctxtrace_allow("leaked", ...)`` lets a test do the named things
on purpose (no names: anything). A test that turns ctxtrace off or on itself
takes the agent over and is not checked; the plugin starts its agent again for
the next test. The ``ctxtrace_events`` fixture lists what the agent saw during
the test, with or without ``--ctxtrace``.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from flask import globals as flask_globals

from ctxtrace import _agent
from ctxtrace._agent import Agent
from ctxtrace._events import ANOMALIES, Anomaly, ContextInfo, Event, OutOfContextAccess, Site
from ctxtrace._host import UnitHandle
from ctxtrace.core.records import UNIT, entry_info

MARKER: Final = "ctxtrace_allow"
ACCESS: Final = "out_of_context_access"
#: What fails a test unless allowed.
FAILING: Final = frozenset(("leaked", ACCESS))
#: The agent the plugin starts when the suite has none: no exporters. No
#: ``repair`` either: the plugin pops what a test left only after the test,
#: never inside the code under test.
#: No report window: an access a later test repeats at the same site must fail that
#: test too, not only be counted (``core.accesses``).
AGENT_OPTIONS: Final = {"metrics": "none", "spans": "off", "log_rate_window": "off"}
_GUARD: Final = "ctxtrace-guard"
_agents: weakref.WeakSet[Agent] = weakref.WeakSet()


def is_plugin_agent(agent: Agent | None) -> bool:
    """Whether ``agent`` was started by this plugin (for suites that manage ctxtrace too)."""
    return agent is not None and agent in _agents


class EventLog:
    """What the agent reported during one test: the ``ctxtrace_events`` fixture."""

    name: Final = "pytest"

    def __init__(self) -> None:
        self.events: list[Event] = []
        #: Tells the running test's pending accesses (see ``accesses``).
        self.settle: Callable[[], None] = lambda: None

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def anomalies(self, name: str | None = None) -> list[Anomaly]:
        """Anomaly events, all or those with one name (``leaked``, ``wrong_pop``...)."""
        return [
            e for e in self.events if isinstance(e, Anomaly) and (name is None or e.name == name)
        ]

    def accesses(self) -> list[OutOfContextAccess]:
        """Out-of-context accesses, those the test has caught so far included.

        An access is told when its outcome is known: ``escaped`` when its error
        fails the test, ``handled`` when the test ends. A test that asks has
        caught the errors it made so far, so they are told as handled first.
        """
        self.settle()
        return [e for e in self.events if isinstance(e, OutOfContextAccess) and not e.summary]

    def clear(self) -> None:
        self.events.clear()

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self.events))

    def __len__(self) -> int:
        return len(self.events)


# -- options and markers ------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctxtrace", "Flask context checks (ctxtrace)")
    group.addoption(
        "--ctxtrace",
        action="store_true",
        default=False,
        help="fail tests that leak a Flask context or use current_app, g, request or "
        "session with no context",
    )
    parser.addini(
        "ctxtrace",
        type="bool",
        default=False,
        help="turn the ctxtrace checks on, as --ctxtrace does",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Registered even when inactive, so marked tests run under --strict-markers.
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*anomalies): ctxtrace lets this test do the named anomalies on purpose "
        f"(leaked, {ACCESS}, ...); with no names, anything",
    )
    if config.getoption("ctxtrace") or config.getini("ctxtrace"):
        config.pluginmanager.register(_Guard(config), _GUARD)


def _allowed(item: pytest.Item) -> frozenset[str] | None:
    """What the test may do; ``None`` means anything."""
    names: set[str] = set()
    for mark in item.iter_markers(MARKER):
        if not mark.args:
            return None
        for name in mark.args:
            if name not in (*ANOMALIES, ACCESS):
                raise pytest.UsageError(
                    f"{item.nodeid}: unknown anomaly {name!r} in @pytest.mark.{MARKER}; "
                    f"known: {', '.join((*ANOMALIES, ACCESS))}"
                )
            names.add(name)
    return frozenset(names)


# -- the guard ------------------------------------------------------------------


@dataclass(frozen=True)
class _Orphan:
    """A context still pushed after the teardown of the wider-scoped fixture that pushed it."""

    ctx: object
    fixturedef: pytest.FixtureDef[Any]
    info: ContextInfo | None


@dataclass
class _Run:
    """One test under watch.

    Its unit begins at the first function-scoped fixture (or at the call):
    pytest sets up broader-scoped fixtures first, and a context a module or
    session fixture keeps pushed across tests is not this test's leak.
    """

    item: pytest.Item
    agent: Agent
    log: EventLog
    allowed: frozenset[str] | None
    handle: UnitHandle | None = None
    started_ns: int = 0
    checked: int = 0
    #: Contexts that outlived the wider-scoped fixture that pushed them, and the fixture.
    orphans: list[_Orphan] = field(default_factory=list)


class _Guard:
    """The active plugin: makes each test a unit and fails it for what it did."""

    def __init__(self, config: pytest.Config) -> None:
        self.root = Path(config.rootpath)
        self.owned: Agent | None = None
        self.log = EventLog()
        self.subscribed: Agent | None = None
        self.run: _Run | None = None
        self.note: str | None = None
        #: What each live fixture of a scope wider than a test pushed and kept
        #: pushed: the contexts its setup left on top of the stacks.
        self.owned_by: dict[pytest.FixtureDef[Any], tuple[object, ...]] = {}

    def agent(self) -> Agent | None:
        """The running agent, started by the plugin when the suite has none."""
        agent = _agent.current()
        if agent is None:
            agent = _agent.start(AGENT_OPTIONS)
            self.owned = agent
            if agent is not None:
                _agents.add(agent)
            else:
                self.note = "ctxtrace is off (CTXTRACE_ENABLED=false or a bad CTXTRACE_* variable)"
        if agent is not None and agent is not self.subscribed:
            if self.subscribed is not None:
                self.subscribed.unsubscribe(self.log)
            agent.subscribe(self.log)
            self.log.settle = agent.ledger.settle_now
            self.subscribed = agent
        return agent

    def pytest_report_header(self) -> str:
        return "ctxtrace: " + (
            self.note or "checking every test for leaked contexts and out-of-context access"
        )

    def pytest_sessionfinish(self) -> None:
        if self.subscribed is not None:
            self.subscribed.unsubscribe(self.log)
            self.subscribed = None
        if self.owned is not None and _agent.current() is self.owned:
            _agent.stop()
        self.owned = None

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self.run = None
        allowed = _allowed(item)
        agent = self.agent()
        if agent is not None:
            self.log.clear()
            self.run = _Run(item, agent, self.log, allowed)
        return (yield from self._phase(item, "setup"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Generator[None, Any, Any]:
        if fixturedef.scope == "function":
            self._begin()
            return (yield)
        before = _flask_tops()
        try:
            return (yield)
        finally:
            # Its setup's contexts are this fixture's until its teardown, whichever
            # test's setup ran it; the top one is enough to know, since nothing
            # below it can be popped before it.
            kept = tuple(
                top for top, was in zip(_flask_tops(), before, strict=False)
                if top is not None and top is not was
            )
            if kept:
                self.owned_by[fixturedef] = kept
                self._disown(kept)

    def _disown(self, kept: tuple[object, ...]) -> None:
        """A wider fixture set up inside a test (``request.getfixturevalue``) pushed these:
        they are not the test's unit's, so the ledger must neither call them the test's
        leak when it ends nor stale in the next test."""
        run = self.run
        if run is None or run.handle is None or run.handle.unit is None:
            return
        unit = run.handle.unit
        for ctx in kept:
            entry = run.agent.ledger.records.get(id(ctx))
            if entry is not None and entry[UNIT] is unit:
                entry[UNIT] = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        kept = self.owned_by.pop(fixturedef, ())
        run = self.run
        agent = _agent.current()
        if run is None or agent is None:
            return
        for ctx in kept:
            with contextlib.suppress(Exception):
                if agent.shape.push_count(ctx) > 0:
                    entry = agent.ledger.records.get(id(ctx))
                    info = entry_info(entry) if entry is not None else None
                    run.orphans.append(_Orphan(ctx, fixturedef, info))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self._begin()
        return (yield from self._phase(item, "call"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._phase(item, "teardown", last=True))

    def _begin(self) -> None:
        run = self.run
        if run is None or run.handle is not None or _agent.current() is not run.agent:
            return
        run.started_ns = time.monotonic_ns()
        run.handle = run.agent.begin_unit("test", run.item.nodeid)

    def _phase(
        self, item: pytest.Item, when: str, *, last: bool = False
    ) -> Generator[None, None, None]:
        try:
            result = yield
        except BaseException as exc:
            run = self.run
            if run is not None and run.handle is not None:
                # The error failed the test: accesses whose errors led to it escaped.
                run.agent.escaped(exc)
            self._check(item, when, last=last, raise_=False)
            raise
        self._check(item, when, last=last, raise_=True)
        return result

    def _check(self, item: pytest.Item, when: str, *, last: bool, raise_: bool) -> None:
        run = self.run
        if run is None:
            return
        if _agent.current() is not run.agent:
            # The test turned ctxtrace off or on itself: it is not ours to judge.
            self.run = None
            return
        popped: set[int] = set()
        orphans: list[str] = []
        # Contexts of wider-scoped fixtures: a leak of the fixture's if any, never the test's.
        fixtures = self._fixture_context_ids(run)
        if last:
            self.run = None
            if run.handle is not None:
                run.agent.end_unit(run.handle)
            # Leave the next test the stacks this one found, whatever it was allowed:
            # pop what the test left, and what outlived its fixture, never what a
            # live fixture holds.
            popped, popped_objects = self._pop_leftovers(run)
            if run.allowed is not None and "leaked" not in run.allowed:
                orphans = [
                    self._describe_orphan(run, o, popped=id(o.ctx) in popped_objects)
                    for o in run.orphans
                ]
        events = run.log.events[run.checked :]
        run.checked += len(events)
        problems = [
            self._describe(e, popped=isinstance(e, Anomaly) and e.context.id in popped)
            for e in events
            if self._fails(run, e)
            and not (isinstance(e, Anomaly) and e.context.id in fixtures)
        ]
        problems += orphans
        if not problems:
            return
        text = "\n".join(problems)
        if raise_:
            pytest.fail(text, pytrace=False)
        # The phase failed anyway: say what ctxtrace saw next to its error.
        item.add_report_section(when, "ctxtrace", text)

    @staticmethod
    def _fails(run: _Run, event: Event) -> bool:
        name = _name(event)
        if name not in FAILING or (run.allowed is None or name in run.allowed):
            return False
        if isinstance(event, OutOfContextAccess):
            # One the test caught (``pytest.raises``, a fallback) is not a failure; one
            # told late (outside any unit, at the sweep) may be an earlier test's.
            return event.outcome == "escaped" and event.at_ns >= run.started_ns
        # A leak the watchdog finds late may be an earlier test's: judge only
        # contexts pushed while this test's unit ran.
        return not isinstance(event, Anomaly) or (
            run.handle is not None and event.context.pushed_ns >= run.started_ns
        )

    def _fixture_context_ids(self, run: _Run, *, live_only: bool = False) -> set[int]:
        """ctxtrace's ids of the contexts wider-scoped fixtures pushed and keep, or
        (unless ``live_only``) kept past their teardown."""
        contexts = [ctx for kept in self.owned_by.values() for ctx in kept]
        if not live_only:
            contexts += [o.ctx for o in run.orphans]
        ids = {run.agent.ledger.context_id(ctx) for ctx in contexts}
        return {i for i in ids if i is not None}

    def _pop_leftovers(self, run: _Run) -> tuple[set[int], set[int]]:
        """Pop, from the top, the contexts this test leaked or a dead fixture left.

        Stops at the first other one: a context of a live fixture of a wider
        scope, or one that was there before the test (an import's, say). Says
        which were popped: by ctxtrace's id and by ``id()``.
        """
        leaked = set()
        if run.handle is not None:
            leaked = {
                e.context.id
                for e in run.log.events
                if isinstance(e, Anomaly)
                and e.name == "leaked"
                and e.context.pushed_ns >= run.started_ns
            }
        leaked -= self._fixture_context_ids(run, live_only=True)
        orphaned = {id(o.ctx) for o in run.orphans}
        popped: set[int] = set()
        popped_objects: set[int] = set()
        ledger = run.agent.ledger
        for var in _flask_stacks():
            for _ in range(100):
                ctx = var.get(None)
                if ctx is None:
                    break
                cid = ledger.context_id(ctx)
                if cid not in leaked and id(ctx) not in orphaned:
                    break
                try:
                    ctx.pop()
                except Exception:
                    # Flask refused (a wrong pop): leave the rest as it is.
                    if var.get(None) is ctx:
                        break
                popped_objects.add(id(ctx))
                if cid is not None:
                    popped.add(cid)
        return popped, popped_objects

    def _describe(self, event: Event, *, popped: bool) -> str:
        if isinstance(event, OutOfContextAccess):
            return (
                f"ctxtrace: {ACCESS}: {event.proxy} used with no context at "
                f"{self._where(event.site)} ({event.phase}, thread {event.thread_name}"
                f"{_unit_text(event)}): {event.exc_type}: {event.exc_message}\n"
                f"  Allow it with @pytest.mark.{MARKER}(\"{ACCESS}\") if the test means it."
            )
        assert isinstance(event, Anomaly)
        ctx = event.context
        return (
            f"ctxtrace: {event.name}: {ctx.kind} context of app {ctx.app!r} pushed at "
            f"{self._where(ctx.site)} (thread {ctx.thread_name}) is still pushed when "
            f"{event.unit.kind + ' ' + event.unit.name if event.unit else 'its unit'} ended"
            f"{'; ctxtrace popped it after the test' if popped or event.repaired else ''}\n"
            f"  Pop it (use `with`), or allow it with @pytest.mark.{MARKER}(\"{event.name}\")."
        )

    def _describe_orphan(self, run: _Run, orphan: _Orphan, *, popped: bool) -> str:
        fixturedef = orphan.fixturedef
        if orphan.info is not None:
            kind, app, where = orphan.info.kind, orphan.info.app, self._where(orphan.info.site)
        else:
            kind, app = run.agent.hooks.describe(orphan.ctx)
            where = "an unknown site"
        return (
            f"ctxtrace: leaked: {kind} context of app {app!r} pushed at {where} by the "
            f"{fixturedef.scope}-scoped fixture {fixturedef.argname!r} is still pushed after "
            f"that fixture's teardown{'; ctxtrace popped it after the test' if popped else ''}\n"
            f"  Pop it in the fixture's teardown (use `with`), or allow it with "
            f"@pytest.mark.{MARKER}(\"leaked\")."
        )

    def _where(self, site: Site | None) -> str:
        if site is None:
            return "an unknown site"
        if site.endpoint is not None:
            return str(site)
        path = site.file
        with contextlib.suppress(ValueError):  # another drive, on Windows
            path = os.path.relpath(path, self.root) if Path(path).is_absolute() else path
        if path.startswith(".."):
            path = site.file
        return f"{path}:{site.line} in {site.function}" if site.function else f"{path}:{site.line}"


def _flask_tops() -> tuple[object, ...]:
    """The contexts on top of this thread's Flask stacks (request stack first, if any)."""
    return tuple(var.get(None) for var in _flask_stacks())


def _flask_stacks() -> list[Any]:
    names = ("_cv_request", "_cv_app")  # Flask 3.2 has only _cv_app
    return [v for v in (getattr(flask_globals, n, None) for n in names) if v is not None]


def _name(event: Event) -> str:
    if isinstance(event, OutOfContextAccess):
        return ACCESS
    return event.name if isinstance(event, Anomaly) else ""


def _unit_text(event: OutOfContextAccess) -> str:
    text = f", unit {event.unit.kind} {event.unit.name}" if event.unit is not None else ""
    if event.parent_unit is not None:
        text += f", started by {event.parent_unit.kind} {event.parent_unit.name}"
    return text


# -- fixture ------------------------------------------------------------------


@pytest.fixture
def ctxtrace_events(request: pytest.FixtureRequest) -> Iterator[EventLog]:
    """What ctxtrace saw during this test (ctxtrace is turned on for it if it was off)."""
    guard = request.config.pluginmanager.get_plugin(_GUARD)
    if isinstance(guard, _Guard) and guard.run is not None:
        yield guard.run.log
        return
    started = _agent.start(AGENT_OPTIONS)
    if started is not None:
        _agents.add(started)
    agent = _agent.current()
    if agent is None:
        pytest.fail("ctxtrace_events: ctxtrace could not be turned on (CTXTRACE_ENABLED=false?)")
    log = EventLog()
    log.settle = agent.ledger.settle_now
    agent.subscribe(log)
    try:
        yield log
    finally:
        agent.unsubscribe(log)
        if started is not None and _agent.current() is started:
            _agent.stop()
