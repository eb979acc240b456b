"""Threads as units of work: leaks named after the thread, accesses named after who started it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask, current_app

import ctxtrace
from ctxtrace._events import Unit
from ctxtrace.core.units import StartedBy

from .._support import line_of

HERE = __file__


def run_thread(target: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return thread


def read_config(errors: list[RuntimeError]) -> None:
    try:
        current_app.config["SECRET_KEY"]  # site: thread-read
    except RuntimeError as exc:
        errors.append(exc)


class TestLeaks:
    """A context still pushed when the thread's run() returns."""

    def test_leak_is_reported_when_the_thread_ends(self, app: Flask, instrumented: Any) -> None:
        """Leaked at the thread's end (not later by the watchdog), named after the thread."""
        recorder = instrumented()

        def job() -> None:
            app.app_context().push()  # site: thread-leak

        run_thread(job, "nightly-export")
        [leak] = recorder.anomalies()
        assert leak.name == "leaked"
        assert leak.reason == "unit_end"
        assert leak.unit is not None
        assert (leak.unit.kind, leak.unit.name) == ("thread", "nightly-export")
        assert leak.context.thread_name == "nightly-export"
        assert leak.context.site is not None
        assert leak.context.site.line == line_of(HERE, "thread-leak")

    def test_thread_subclass_with_its_own_run(self, app: Flask, instrumented: Any) -> None:
        """A Thread subclass overriding run() is a unit too."""
        recorder = instrumented()

        class Exporter(threading.Thread):
            def run(self) -> None:
                app.app_context().push()

        thread = Exporter(name="exporter")
        thread.start()
        thread.join(10)
        [leak] = recorder.anomalies("leaked")
        assert leak.unit is not None and leak.unit.name == "exporter"

    def test_with_block_in_a_thread_is_silent(self, app: Flask, instrumented: Any) -> None:
        """Push and pop with ``with`` in a thread: nothing reported."""
        recorder = instrumented()
        names: list[str] = []

        def job() -> None:
            with app.app_context():
                names.append(current_app.name)

        run_thread(job, "tidy")
        assert names == ["shop"]
        assert recorder.events == []

    def test_repair_pops_the_leak_and_runs_its_teardown(
        self, app: Flask, instrumented: Any
    ) -> None:
        """With repair on, the leaked context is popped at the thread's end."""
        recorder = instrumented(repair=True)
        torn_down: list[object] = []
        app.teardown_appcontext(torn_down.append)
        run_thread(lambda: app.app_context().push(), "leaky")
        [leak] = recorder.anomalies("leaked")
        assert leak.repaired
        assert len(torn_down) == 1


class TestAccess:
    """current_app read in a thread that has no context."""

    def test_thread_started_by_a_request_names_the_request(
        self, app: Flask, instrumented: Any
    ) -> None:
        """The most common cause: the access names the thread and the request that started it."""
        recorder = instrumented()
        errors: list[RuntimeError] = []

        @app.route("/signup", endpoint="signup")
        def signup() -> str:
            run_thread(lambda: read_config(errors), "mailer")
            return "ok"

        assert app.test_client().get("/signup").status_code == 200
        assert len(errors) == 1
        [access] = recorder.accesses()
        assert access.thread_name == "mailer"
        assert access.unit is not None
        assert (access.unit.kind, access.unit.name) == ("thread", "mailer")
        assert access.parent_unit is not None
        assert (access.parent_unit.kind, access.parent_unit.name) == ("request", "signup")
        assert access.site is not None
        assert (access.site.file, access.site.line) == (HERE, line_of(HERE, "thread-read"))
        assert recorder.anomalies() == []

    def test_thread_started_outside_any_unit_has_no_parent(self, instrumented: Any) -> None:
        """A thread started at module level or by a script: no parent to name."""
        recorder = instrumented()
        errors: list[RuntimeError] = []
        run_thread(lambda: read_config(errors), "scheduler")
        [access] = recorder.accesses()
        assert access.unit is not None and access.unit.name == "scheduler"
        assert access.parent_unit is None

    def test_nested_threads_name_their_direct_parent(self, instrumented: Any) -> None:
        """A thread started by a thread: the parent is the starting thread's unit."""
        recorder = instrumented()
        errors: list[RuntimeError] = []
        run_thread(lambda: run_thread(lambda: read_config(errors), "inner"), "outer")
        [access] = recorder.accesses()
        assert access.parent_unit is not None
        assert (access.parent_unit.kind, access.parent_unit.name) == ("thread", "outer")

    def test_async_view_leaves_no_starter_on_the_calling_thread(
        self, app: Flask, instrumented: Any
    ) -> None:
        """asgiref copies its loop thread's context back: no parent sticks to this thread."""
        pytest.importorskip("asgiref")
        recorder = instrumented()

        @app.route("/async", endpoint="slow")
        async def slow() -> str:
            return str(current_app.name)

        assert app.test_client().get("/async").get_data(as_text=True) == "shop"
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018 - the failed access is the point
        [access] = recorder.accesses()
        assert access.parent_unit is None
        assert access.unit is None


class TestPatch:
    """What the patch leaves behind, and what it leaves alone."""

    @pytest.mark.usefixtures("no_agent")
    def test_uninstrument_restores_thread_start(self) -> None:
        """Thread.start is the identical function again after uninstrument."""
        original = vars(threading.Thread)["start"]
        assert ctxtrace.instrument(metrics="none")
        assert vars(threading.Thread)["start"] is not original
        assert ctxtrace.uninstrument()
        assert vars(threading.Thread)["start"] is original

    def test_no_reference_to_the_wrapper_stays_on_the_thread(self, instrumented: Any) -> None:
        """The per-thread run wrapper is removed as the thread starts running."""
        instrumented()
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append("run" in vars(thread)))
        thread.start()
        thread.join(10)
        assert seen == [False]
        assert "run" not in vars(thread)

    def test_a_thread_outliving_the_agent_reports_nothing(
        self, app: Flask, instrumented: Any
    ) -> None:
        """A thread still running at uninstrument ends without reports from the old agent."""
        recorder = instrumented()
        go = threading.Event()

        def job() -> None:
            go.wait(10)
            app.app_context().push()

        thread = threading.Thread(target=job, name="straggler")
        thread.start()
        assert ctxtrace.uninstrument()
        go.set()
        thread.join(10)
        assert recorder.events == []

    def test_ctxtrace_own_threads_are_not_units(self, app: Flask, instrumented: Any) -> None:
        """Threads named ctxtrace-* (watchdog, exporters) are not the application's units."""
        recorder = instrumented(sweep_interval=3600)
        run_thread(lambda: app.app_context().push(), "ctxtrace-exporter")
        assert recorder.events == []  # no unit, so no unit_end report

    def test_after_fork_only_the_forking_thread_keeps_its_starter(self) -> None:
        """A child keeps the forking thread's starter; other threads' idents may be reused."""
        registry = StartedBy()
        parent = Unit(id=1, kind="request", name="checkout")
        registry.enter(parent)
        other = threading.Thread(target=lambda: registry.enter(Unit(2, "request", "other")))
        other.start()
        other.join(10)
        registry.after_fork()
        assert registry.get() == parent
        assert len(registry._by_thread) == 1

    @pytest.mark.parametrize("daemon", [True, False])
    def test_thread_result_and_exception_are_untouched(
        self, instrumented: Any, daemon: bool
    ) -> None:
        """An exception in the thread still reaches threading.excepthook, unchanged."""
        instrumented()
        caught: list[BaseException | None] = []
        previous = threading.excepthook
        threading.excepthook = lambda args: caught.append(args.exc_value)
        try:
            thread = threading.Thread(target=lambda: 1 / 0, daemon=daemon)
            thread.start()
            thread.join(10)
        finally:
            threading.excepthook = previous
        assert len(caught) == 1 and isinstance(caught[0], ZeroDivisionError)
