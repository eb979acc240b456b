"""RQ jobs as units of work: a real ``rq worker --burst`` forking work-horses, on a real Redis."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import redis
from rq import Queue

from .._servers import assert_prints_ok, python, stop
from .._support import line_of
from ..fixtures import event_file, rq_jobs

JOBS = rq_jobs.__file__
JOB = "tests.fixtures.rq_jobs"
WORKER_TIMEOUT_S = 60.0


def site(marker: str) -> str:
    return f"{JOBS}:{line_of(JOBS, marker)}"


@pytest.fixture(scope="module")
def burst(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Enqueue one job of each kind, run a burst worker to the end, collect what it saw."""
    tmp = tmp_path_factory.mktemp("rq")
    events = tmp / "events.jsonl"
    log = tmp / "worker.log"
    connection = redis.Redis.from_url(redis_url)
    try:
        queue = Queue("ctxtrace-tests", connection=connection)
        jobs = {
            name: queue.enqueue(f"{JOB}.{name}", job_id=f"ctxtrace-{name}")
            for name in ("with_context", "forgot_context", "leaks")
        }
        process = python(
            "-m", "rq.cli", "worker", "--burst", "--url", redis_url,
            "-c", "tests.fixtures.rq_settings", "--name", "ctxtrace-tests", "ctxtrace-tests",
            env={event_file.EVENTS_ENV: str(events)},
            log=log,
        )
        try:
            status = process.wait(WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rq worker still running after {WORKER_TIMEOUT_S:g} s")
        finally:
            stop(process, group=True)
        assert status == 0, log.read_text()[-3000:]
        states = {name: job.get_status(refresh=True) for name, job in jobs.items()}
    finally:
        connection.close()
    return {
        "states": states,
        "events": event_file.read(str(events)),
        "unflushed": event_file.read(str(events) + ".unflushed"),
        "worker_pid": process.pid,
    }


def by_unit(burst: dict[str, Any], job: str) -> list[dict[str, Any]]:
    return [e for e in burst["events"] if e["unit"] == f"job:{JOB}.{job}"]


def test_jobs_ran_in_work_horses(burst: dict[str, Any]) -> None:
    """The worker forked a horse per job; the one without a context failed."""
    assert burst["states"] == {
        "with_context": "finished", "forgot_context": "failed", "leaks": "finished"
    }
    pids = {e["pid"] for e in burst["events"]}
    assert len(pids) == 2 and burst["worker_pid"] not in pids


def test_job_without_app_context_is_reported_with_its_name(burst: dict[str, Any]) -> None:
    """current_app in a job with no context: the job's function and line, role rq."""
    [access] = by_unit(burst, "forgot_context")
    assert access["event"] == "out_of_context_access"
    assert access["proxy"] == "current_app"
    assert access["site"] == site("job-forgot")
    assert access["worker"].endswith(":rq")


def test_job_with_app_context_is_silent(burst: dict[str, Any]) -> None:
    """A job that runs inside ``with app.app_context()`` reports nothing."""
    assert by_unit(burst, "with_context") == []


def test_leak_is_reported_at_job_end(burst: dict[str, Any]) -> None:
    """A job that pushes and never pops: leaked at the end of the job, with the job's name."""
    [leak] = by_unit(burst, "leaks")
    assert leak["event"] == "leaked"
    assert leak["site"] == site("job-leak")
    assert leak["reason"] == "unit_end"


def test_only_a_flush_at_job_end_gets_events_out_of_a_horse(burst: dict[str, Any]) -> None:
    """The horse exits with os._exit: a buffer that waits for stop() loses everything."""
    assert len(burst["events"]) == 2
    assert burst["unflushed"] == []


def test_rq_is_hooked_only_once_the_application_imports_it() -> None:
    """instrument() does not import RQ (130 ms); importing it later wraps perform_job."""
    script = (
        "import sys, ctxtrace\n"
        "ctxtrace.instrument(metrics='none')\n"
        "assert 'rq' not in sys.modules, 'imported by ctxtrace'\n"
        "import rq.worker\n"
        "original = rq.worker.BaseWorker.__dict__['perform_job']\n"
        "assert hasattr(original, '__wrapped__')\n"
        "ctxtrace.uninstrument()\n"
        "assert rq.worker.BaseWorker.__dict__['perform_job'] is original.__wrapped__\n"
        "print('ok')\n"
    )
    assert_prints_ok(script)


