"""ThreadPoolExecutor work items as units: leaks at the task's end, stale for the next task."""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any

import pytest
from flask import Flask, current_app, g

import ctxtrace
from ctxtrace import _agent
from ctxtrace.integrations.executors import unit_name

from .._support import line_of

HERE = __file__


def leave_pushed(app: Flask) -> None:
    app.app_context().push()  # site: task-leak
    g.user = "alice"


def read_user(app: Flask) -> str | None:
    return g.get("user")


def read_config(errors: list[RuntimeError]) -> None:
    try:
        current_app.config["SECRET_KEY"]  # site: task-read
    except RuntimeError as exc:
        errors.append(exc)


class TestLeaks:
    """A task that pushes a context and returns without popping it."""

    def test_leaked_at_the_tasks_end_and_stale_for_the_next_task(
        self, app: Flask, instrumented: Any
    ) -> None:
        """One pool thread: the leak is the task's, the next task on the thread finds it stale."""
        recorder = instrumented()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(leave_pushed, app).result(10)
            [leak] = recorder.anomalies()
            assert (leak.name, leak.reason) == ("leaked", "unit_end")
            assert leak.unit is not None
            assert (leak.unit.kind, leak.unit.name) == ("executor", f"{__name__}.leave_pushed")
            assert leak.context.site is not None
            assert leak.context.site.line == line_of(HERE, "task-leak")
            # Flask <= 3.1: the next task on that thread reads the first one's g.
            inherited = pool.submit(read_user, app).result(10)
        [stale] = recorder.anomalies("stale_context")
        assert stale.unit is not None
        assert (stale.unit.kind, stale.unit.name) == ("executor", f"{__name__}.read_user")
        assert stale.context.id == leak.context.id
        assert inherited in ("alice", None)  # None where Flask no longer shares g
        assert len(recorder.anomalies()) == 2

    def test_a_task_that_pops_what_it_pushes_is_silent(
        self, app: Flask, instrumented: Any
    ) -> None:
        """``with app.app_context()`` in tasks, map() included: nothing reported."""
        recorder = instrumented()

        def name(_: int) -> str:
            with app.app_context():
                return str(current_app.name)

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            assert list(pool.map(name, range(20))) == ["shop"] * 20
        assert recorder.events == []

    def test_handed_over_with_context_executor_is_silent(
        self, app: Flask, instrumented: Any
    ) -> None:
        """ctxtrace's own ContextExecutor, around a real pool, from a request: clean."""
        recorder = instrumented()
        pool = ctxtrace.ContextExecutor(max_workers=1)

        @app.route("/hand-over", endpoint="hand_over")
        def hand_over() -> str:
            return str(pool.submit(lambda: current_app.name).result(10))

        try:
            assert app.test_client().get("/hand-over").get_data(as_text=True) == "shop"
        finally:
            pool.shutdown()
        assert recorder.events == []


    def test_async_views_run_through_asgiref_pools_silently(
        self, app: Flask, instrumented: Any
    ) -> None:
        """asgiref runs an async view's loop on a pool thread: nothing reported, and no unit
        of that pool sticks to the calling thread."""
        pytest.importorskip("asgiref")
        recorder = instrumented()

        @app.route("/async", endpoint="slow")
        async def slow() -> str:
            return str(current_app.name)

        client = app.test_client()
        for _ in range(3):
            assert client.get("/async").get_data(as_text=True) == "shop"
        assert recorder.events == []
        agent = _agent.current()
        assert agent is not None and agent.current_unit() is None


class TestStartedBy:
    """An access in a task names the unit that submitted it."""

    def test_the_submitting_request_not_the_one_that_started_the_thread(
        self, app: Flask, instrumented: Any
    ) -> None:
        """The first request starts the pool thread; the second request's task names it."""
        recorder = instrumented()
        errors: list[RuntimeError] = []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

        @app.route("/warm", endpoint="warm")
        def warm() -> str:
            pool.submit(lambda: None).result(10)
            return "ok"

        @app.route("/signup", endpoint="signup")
        def signup() -> str:
            pool.submit(read_config, errors).result(10)
            return "ok"

        try:
            client = app.test_client()
            assert client.get("/warm").status_code == 200
            assert client.get("/signup").status_code == 200
            pool.submit(read_config, errors).result(10)
        finally:
            pool.shutdown()
        assert len(errors) == 2
        first, second = recorder.accesses()
        for access in (first, second):
            assert access.unit is not None
            assert (access.unit.kind, access.unit.name) == ("executor", f"{__name__}.read_config")
            assert access.site is not None and access.site.line == line_of(HERE, "task-read")
        assert first.parent_unit is not None
        assert (first.parent_unit.kind, first.parent_unit.name) == ("request", "signup")
        # Submitted outside any unit: no starter, not the request that started the thread.
        assert second.parent_unit is None
        assert recorder.anomalies() == []


class TestPatch:
    """What the patch changes, and what it leaves alone."""

    def test_results_and_exceptions_are_untouched(self, instrumented: Any) -> None:
        """A task's value and its exception reach the Future unchanged."""
        instrumented()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(pow, 2, 10).result(10) == 1024
            future = pool.submit(lambda: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                future.result(10)

    def test_fail_open_when_the_task_cannot_be_named(self, instrumented: Any) -> None:
        """A callable whose attributes raise still runs, once, outside a unit; counted."""
        instrumented()

        class Hostile:
            calls = 0

            def __getattr__(self, name: str) -> Any:
                raise RuntimeError(f"no {name}")

            def __call__(self) -> str:
                type(self).calls += 1
                return "ran"

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(Hostile()).result(10) == "ran"
        assert Hostile.calls == 1
        agent = _agent.current()
        assert agent is not None and agent.errors.counts() == {"executors": 1}

    @pytest.mark.usefixtures("no_agent")
    def test_uninstrument_restores_submit(self) -> None:
        """ThreadPoolExecutor.submit is the identical function again after uninstrument."""
        original = vars(concurrent.futures.ThreadPoolExecutor)["submit"]
        assert ctxtrace.instrument(metrics="none")
        assert vars(concurrent.futures.ThreadPoolExecutor)["submit"] is not original
        assert ctxtrace.uninstrument()
        assert vars(concurrent.futures.ThreadPoolExecutor)["submit"] is original

    def test_unit_names_see_through_partials_and_wrappers(self) -> None:
        """A partial or a functools.wraps wrapper is named after the function inside."""

        @functools.wraps(read_config)
        def wrapper(*args: Any) -> None:
            read_config(*args)

        assert unit_name(functools.partial(read_config, [])) == f"{__name__}.read_config"
        assert unit_name(wrapper) == f"{__name__}.read_config"
        assert unit_name(TestPatch().test_unit_names_see_through_partials_and_wrappers) == (
            f"{__name__}.TestPatch.test_unit_names_see_through_partials_and_wrappers"
        )
