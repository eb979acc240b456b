"""RQ jobs as units of work: a real ``rq worker --burst`` forking work-horses, on a real Redis."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue

from .._servers import assert_prints_ok, python, stop
from .._support import line_of
from ..fixtures import event_file, rq_jobs

JOBS = rq_jobs.__file__
# Named, never imported here: its import pushes a context into whoever imports it.
TUTORIAL_MODULE = "tests.fixtures.rq_tutorial"
TUTORIAL = str(Path(JOBS).with_name("rq_tutorial.py"))
JOB = "tests.fixtures.rq_jobs"
WORKER_TIMEOUT_S = 60.0


def site(marker: str) -> str:
    return f"{JOBS}:{line_of(JOBS, marker)}"


def run_burst(
    redis_url: str, tmp: Path, queue_name: str, functions: dict[str, str], *options: str,
    settings: str = "tests.fixtures.rq_settings",
) -> dict[str, Any]:
    """Enqueue ``functions`` (job id -> dotted name), run ``rq worker --burst OPTIONS`` to the
    end, collect what it saw and its log."""
    events = tmp / "events.jsonl"
    log = tmp / "worker.log"
    connection = redis.Redis.from_url(redis_url)
    try:
        queue = Queue(queue_name, connection=connection)
        jobs = {
            job_id: queue.enqueue(function, job_id=f"{queue_name}-{job_id}")
            for job_id, function in functions.items()
        }
        process = python(
            "-m", "rq.cli", "worker", "--burst", "--url", redis_url, *options,
            "-c", settings, "--name", queue_name, queue_name,
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
        "log": log.read_text(errors="replace"),
    }


@pytest.fixture(scope="module")
def burst(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Enqueue one job of each kind, run a burst worker to the end, collect what it saw."""
    return run_burst(
        redis_url, tmp_path_factory.mktemp("rq"), "ctxtrace-tests",
        {name: f"{JOB}.{name}" for name in ("with_context", "forgot_context", "leaks")},
    )


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




# -- a tasks module that pushes a context at import (a widely followed tutorial) ---

#: Jobs of the tutorial's module per worker run: more than one, so a per-job report shows.
TUTORIAL_JOBS = 3
WORKER_CLASSES = {"forking": (), "simple": ("--worker-class", "rq.SimpleWorker")}


@pytest.fixture(scope="module", params=list(WORKER_CLASSES))
def tutorial(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``TUTORIAL_JOBS`` jobs of the tutorial's module through one burst worker of a class."""
    worker_class: str = request.param
    result = run_burst(
        redis_url, tmp_path_factory.mktemp(f"rq-{worker_class}"), f"ctxtrace-{worker_class}",
        {f"job{n}": f"{TUTORIAL_MODULE}.shop_name" for n in range(TUTORIAL_JOBS)},
        *WORKER_CLASSES[worker_class],
    )
    result["worker_class"] = worker_class
    return result


def test_import_time_context_serves_every_job(tutorial: dict[str, Any]) -> None:
    """The tutorial's pattern works: every job runs in the context its module pushed."""
    assert set(tutorial["states"].values()) == {"finished"}, tutorial["log"][-3000:]


def test_import_time_context_is_reported_once_per_process(tutorial: dict[str, Any]) -> None:
    """Not leaked at each job's end, not stale at the next job's start: one ``long_lived``
    with reason ``import`` at the module's push line, per process that imported it."""
    events = tutorial["events"]
    assert [e["event"] for e in events if e["event"] != "long_lived"] == []
    push_site = f"{TUTORIAL}:{line_of(TUTORIAL, 'tutorial-push')}"
    assert {(e["reason"], e["site"]) for e in events} == {("import", push_site)}
    pids = [e["pid"] for e in events]
    assert len(set(pids)) == len(pids), "reported twice in one process"
    if tutorial["worker_class"] == "simple":
        # One process runs every job: one report, whichever job imported the module.
        assert pids == [tutorial["worker_pid"]]
    else:
        # Each work-horse imports the module again (the worker never did): once each.
        assert len(pids) == TUTORIAL_JOBS and tutorial["worker_pid"] not in pids


def test_import_time_context_logs_a_warning_not_an_error(tutorial: dict[str, Any]) -> None:
    """ctxtrace's own log lines for it are warnings: nothing that pages."""
    lines = [
        json.loads(line) for line in tutorial["log"].splitlines()
        if line.startswith("{") and '"ctxtrace.' in line
    ]
    assert {(line["event"], line["level"], line.get("reason")) for line in lines} == {
        ("ctxtrace.long_lived", "warning", "import")
    }


def test_import_time_context_in_the_forking_worker_is_reported_once(
    redis_url: str, tmp_path: Path
) -> None:
    """The tasks module imported by the worker before it forks (its settings module): said
    once, by the worker; the work-horses inherit the context and say nothing."""
    result = run_burst(
        redis_url, tmp_path, "ctxtrace-forking-preimported",
        {f"job{n}": f"{TUTORIAL_MODULE}.shop_name" for n in range(TUTORIAL_JOBS)},
        settings="tests.fixtures.rq_settings_tutorial",
    )
    assert set(result["states"].values()) == {"finished"}, result["log"][-3000:]
    lines = [
        json.loads(line) for line in result["log"].splitlines()
        if line.startswith("{") and '"ctxtrace.' in line
    ]
    assert [(line["event"], line["level"], line["reason"], line["pid"]) for line in lines] == [
        ("ctxtrace.long_lived", "warning", "import", result["worker_pid"])
    ]
