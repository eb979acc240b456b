"""Celery tasks as units of work: a real worker process (prefork pool) on a real Redis broker."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import TimeoutError as CeleryTimeout

import ctxtrace
from ctxtrace import _agent

from .._servers import assert_prints_ok, python, stop, wait_until
from .._support import line_of
from ..fixtures import celery_tasks, event_file

TASKS = celery_tasks.__file__
CELERY_TIMEOUT_S = 30.0


def site(marker: str) -> str:
    return f"{TASKS}:{line_of(TASKS, marker)}"


@dataclass
class Worker:
    """A running ``celery worker`` and a client app to send it tasks by name."""

    process: subprocess.Popen[bytes]
    client: Any
    queue: str
    events_path: Path
    log: Path

    def run(self, name: str, *args: Any, timeout: float = CELERY_TIMEOUT_S) -> tuple[str, Any]:
        """Send a task and wait for its outcome: (state, result or exception)."""
        result = self.client.send_task(name, args=args, queue=self.queue)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the celery worker exited:\n{self.log.read_text()[-3000:]}")
            try:
                value = result.get(timeout=0.5, propagate=False)
            except CeleryTimeout:
                continue
            return str(result.state), value
        pytest.fail(f"task {name} got no result in {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def events(self) -> list[dict[str, Any]]:
        return event_file.read(str(self.events_path))

    def settle(self) -> list[dict[str, Any]]:
        """Run a barrier task and wait for its report: every earlier task has then ended."""
        def barriers() -> list[dict[str, Any]]:
            return [e for e in self.events() if e["unit"] == "task:ctxtrace_tests.barrier"]

        before = len(barriers())
        assert self.run("ctxtrace_tests.barrier", "settle") == ("SUCCESS", "settle")
        wait_until(lambda: len(barriers()) > before, timeout=10, what="the barrier's report")
        return [e for e in self.events() if e["unit"] != "task:ctxtrace_tests.barrier"]


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("celery")
    queue = f"ctxtrace-tests-{os.getpid()}"
    events = tmp / "events.jsonl"
    log = tmp / "worker.log"
    process = python(
        "-m", "celery", "-A", "tests.fixtures.celery_worker", "worker",
        "--pool=prefork", "--concurrency=1", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--loglevel=WARNING", "-Q", queue,
        "-n", f"ctxtrace-{os.getpid()}@127.0.0.1",
        env={
            celery_tasks.REDIS_ENV: redis_url,
            celery_tasks.QUEUE_ENV: queue,
            event_file.EVENTS_ENV: str(events),
        },
        log=log,
    )
    client = Celery("ctxtrace_tests_client", broker=redis_url, backend=redis_url)
    try:
        running = Worker(process, client, queue, events, log)
        running.run("ctxtrace_tests.barrier", "ready", timeout=60)
        yield running
    finally:
        client.close()
        stop(process, group=True)


class TestWorker:
    """What a real worker reports, task by task."""

    def test_task_without_app_context_is_reported_with_its_name(self, worker: Worker) -> None:
        """current_app in a task declared without the Flask base class: the task's line."""
        state, error = worker.run("ctxtrace_tests.forgot_context")
        assert state == "FAILURE"
        assert "Working outside of application context" in str(error)
        events = worker.settle()
        [access] = [e for e in events if e["unit"] == "task:ctxtrace_tests.forgot_context"]
        assert access["event"] == "out_of_context_access"
        assert access["proxy"] == "current_app"
        assert access["phase"] == "runtime"
        assert access["site"] == site("task-forgot")
        assert access["worker"].endswith(":celery")
        assert access["pid"] != worker.process.pid  # a prefork pool process, not the main one

    def test_flask_task_base_class_is_silent(self, worker: Worker) -> None:
        """A Task base class whose __call__ runs inside app.app_context(): nothing reported."""
        assert worker.run("ctxtrace_tests.with_context") == ("SUCCESS", "celery-shop")
        events = worker.settle()
        assert [e for e in events if "with_context" in f"{e['unit']} {e.get('pushed_in')}"] == []

    def test_thread_started_by_a_task_names_the_task(self, worker: Worker) -> None:
        """A thread a task starts reads current_app: the thread's unit, started by the task."""
        assert worker.run("ctxtrace_tests.starts_thread") == ("SUCCESS", "joined")
        events = worker.settle()
        [access] = [e for e in events if e["unit"] == "thread:task-helper"]
        assert access["parent_unit"] == "task:ctxtrace_tests.starts_thread"
        assert access["site"] == site("task-thread")
        assert access["thread"] == "task-helper"

    def test_leak_is_reported_at_task_end_and_stale_in_the_next_task(
        self, worker: Worker
    ) -> None:
        """A task that pushes and never pops: leaked with its name, stale for the next task."""
        assert worker.run("ctxtrace_tests.leaks") == ("SUCCESS", "pushed")
        # The next task on that pool process finds the app context: the bug hides itself.
        assert worker.run("ctxtrace_tests.after_leak") == ("SUCCESS", "celery-shop")
        assert worker.run("ctxtrace_tests.clean_up") == ("SUCCESS", 1)
        events = worker.settle()
        [leak] = [e for e in events if e["event"] == "leaked"]
        assert leak["unit"] == "task:ctxtrace_tests.leaks"
        assert leak["pushed_in"] == "task:ctxtrace_tests.leaks"
        assert leak["site"] == site("task-leak")
        assert leak["reason"] == "unit_end"
        assert not leak["repaired"]
        stale = [e for e in events if e["event"] == "stale_context"]
        assert stale[0]["unit"] == "task:ctxtrace_tests.after_leak"
        assert stale[0]["pushed_in"] == "task:ctxtrace_tests.leaks"

    def test_pool_process_flushes_as_it_exits(self, worker: Worker) -> None:
        """Pool processes end with os._exit: what waits in a buffer is flushed on the way out."""
        flushed = Path(str(worker.events_path) + ".flushed")
        assert event_file.read(str(flushed)) == []  # nothing flushed while it runs
        # Every task has ended and told its events (the fixture's ready barrier
        # included: alone on an xdist worker, this test would otherwise race it).
        worker.settle()
        seen = len(worker.events())
        stop(worker.process, group=True)  # warm shutdown: the pool process exits too
        assert len(event_file.read(str(flushed))) == seen


class TestInProcess:
    """The same signals drive eagerly applied tasks in the calling process."""

    def test_eager_task_is_a_unit(self, instrumented: Any) -> None:
        """task.apply() runs the tracer here: the access names the task, the role stays."""
        recorder = instrumented()
        agent = _agent.current()
        assert agent is not None
        worker_label = agent.worker
        result = celery_tasks.forgot_context.apply()
        assert isinstance(result.result, RuntimeError)
        [access] = recorder.accesses()
        assert access.unit is not None
        assert (access.unit.kind, access.unit.name) == ("task", "ctxtrace_tests.forgot_context")
        assert agent.worker == worker_label  # eager: this process is not a Celery worker

    def test_repair_pops_what_a_task_leaked(self, instrumented: Any) -> None:
        """With repair on, the leaked context is reported as repaired and is gone after."""
        recorder = instrumented(repair=True)
        torn_down: list[object] = []
        celery_tasks.flask_app.teardown_appcontext_funcs.append(torn_down.append)
        try:
            assert celery_tasks.leaks.apply().result == "pushed"
        finally:
            celery_tasks.flask_app.teardown_appcontext_funcs.remove(torn_down.append)
        [leak] = recorder.anomalies("leaked")
        assert leak.repaired
        assert leak.unit is not None and leak.unit.name == "ctxtrace_tests.leaks"
        assert len(torn_down) == 1

    def test_uninstrument_disconnects_every_receiver(self, instrumented: Any) -> None:
        """No ctxtrace receiver stays connected to Celery's signals after uninstrument."""
        watched = (signals.task_prerun, signals.task_postrun, signals.worker_process_shutdown)
        before = [len(s.receivers) for s in watched]
        instrumented()
        assert [len(s.receivers) for s in watched] == [n + 1 for n in before]
        ctxtrace.uninstrument()
        assert [len(s.receivers) for s in watched] == before


def test_celery_is_hooked_only_once_the_application_imports_it() -> None:
    """instrument() does not import Celery (70 ms); importing it later hooks it."""
    script = (
        "import sys, ctxtrace\n"
        "ctxtrace.instrument(metrics='none')\n"
        "assert 'celery.signals' not in sys.modules, 'imported by ctxtrace'\n"
        "from celery import signals\n"
        "names = [getattr(r[1], '__qualname__', '') for r in signals.task_prerun.receivers]\n"
        "assert any('prerun' in n for n in names), names\n"
        "ctxtrace.uninstrument()\n"
        "assert not signals.task_prerun.receivers\n"
        "assert not [f for f in sys.meta_path if 'ctxtrace' in type(f).__module__]\n"
        "print('ok')\n"
    )
    assert_prints_ok(script)
