"""One address per host: a real ``gunicorn --preload`` with 4 workers and ``--max-requests``
churn, scraped through the host's one ``/metrics`` and through each process's own.

Run with ``CTXTRACE_PROMETHEUS_SCRAPE=both``, so that both exist at once and can be
compared: every series the per-worker endpoints serve (with the ``worker`` label
file_sd gives their process metrics) is on the host's address, with the same value;
every worker gunicorn retired is there too, with the exact counts it ended with,
until ``CTXTRACE_PROMETHEUS_RETAIN`` after its exit, and then gone.
"""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue

from .._exposition import Series, series
from .._servers import (
    BIN,
    ctxtrace_gunicorn,
    ctxtrace_run,
    file_sd_targets,
    free_range,
    redis_server,
    stop,
    wait_until,
)
from ..fixtures.rq_jobs import RQ_JOBS, enqueue_all

WORKERS = 4
MAX_REQUESTS = 5
REQUESTS = 48
DOUBLE_POPS = 6
#: Seconds the host serves a retired worker's series: longer than the whole run takes on a
#: loaded machine, or the first retired workers would be gone before the host is scraped.
RETAIN_S = 25.0
#: Ports for the host's address (the first) and each process's own endpoint.
PORTS = 40
#: Process metrics that move by themselves between two scrapes: compared by presence.
MOVING = frozenset(
    {"process_cpu_seconds_total", "process_resident_memory_bytes",
     "process_virtual_memory_bytes", "process_open_fds"}
)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _own(target: str, worker: str) -> Series:
    """A process's own endpoint as Prometheus stores it: file_sd's ``worker`` on the
    series that do not carry one (``honor_labels: true``)."""
    return {
        (name, tuple(sorted({"worker": worker, **dict(labels)}.items()))): value
        for (name, labels), value in series(_get(f"http://{target}/metrics")).items()
    }


def _by_worker(samples: Series) -> dict[str, Series]:
    found: dict[str, Series] = {}
    for key, value in samples.items():
        found.setdefault(dict(key[1])["worker"], {})[key] = value
    return found


def _shape(samples: Series, worker: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The series of one worker with its name blanked (``worker``, and ``target_info``'s
    ``service_instance_id``): what any worker of the app has."""
    return {
        (name, tuple((k, "W" if v == worker else v) for k, v in labels))
        for (name, labels) in samples
        if dict(labels)["worker"] == worker
    }


def _value(samples: Series, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _check_live(
    found: dict[int, dict[str, Any]], by_worker: dict[str, Series], master: int
) -> None:
    """Each live process on the host's address: exactly what its own endpoint serves."""
    for pid, entry in found.items():
        worker = entry["labels"]["worker"]
        (target,) = entry["targets"]
        own = _own(target, worker)
        assert set(by_worker[worker]) == set(own), worker
        assert {k: v for k, v in own.items() if k[0] not in MOVING} == {
            k: v for k, v in by_worker[worker].items() if k[0] not in MOVING
        }, worker
        role = "gunicorn-master" if pid == master else "gunicorn"
        assert worker.endswith(f":{pid}:{role}")


def _check_retired(
    on_host: Series, names: dict[int, str], live_worker: str, served: Counter[int],
    double_pops: Counter[int],
) -> None:
    """Each retired worker: the exact counts it ended with; the series of a live worker,
    and the histograms of both kinds (every one served requests)."""
    by_worker = _by_worker(on_host)
    shapes = {frozenset(_shape(on_host, worker)) for worker in names.values()}
    assert len(shapes) == 1 and next(iter(shapes)) >= _shape(on_host, live_worker)
    for pid, worker in names.items():
        samples = by_worker[worker]
        requests = served[pid] + double_pops[pid]
        common = {"app": "shop", "worker": worker}
        assert _value(samples, "ctxtrace_contexts_total", kind="request", **common) == requests
        assert _value(
            samples, "ctxtrace_contexts_total", kind="app", **common
        ) == requests + double_pops[pid]
        assert _value(
            samples, "ctxtrace_context_duration_seconds_count", kind="request", **common
        ) == requests
        assert _value(
            samples, "ctxtrace_anomalies_total", anomaly="double_pop", kind="app", **common
        ) == double_pops[pid]
        active = ("ctxtrace_contexts_active", tuple(sorted({**common, "kind": "request"}.items())))
        assert samples[active] == 0


def test_one_address_serves_exactly_what_each_worker_served(tmp_path: Path) -> None:
    """4 sync workers replaced every 5 requests under --preload: the host's address has the
    master's, each live worker's and each retired worker's series, exactly; the retired
    ones leave after the retention."""
    first = free_range(PORTS)[0]
    process, base, targets, log = ctxtrace_gunicorn(
        tmp_path, "tests.fixtures.telemetry_app:app", "-w", str(WORKERS),
        "--max-requests", str(MAX_REQUESTS), "--max-requests-jitter", "0",
        sets=(
            "prometheus_scrape=both", f"prometheus_port={first}-{first + PORTS - 1}",
            f"prometheus_spool_dir={tmp_path / 'spool'}", f"prometheus_retain={RETAIN_S}",
        ),
    )
    host = f"http://127.0.0.1:{first}/metrics"
    master = process.pid
    served: Counter[int] = Counter()
    double_pops: Counter[int] = Counter()
    try:
        def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited: {log.read_text()[-2000:]}", pytrace=False)
            return len(file_sd_targets(targets)) == WORKERS + 1

        # No request before: each one counts towards a worker's retirement.
        wait_until(up, timeout=30, what="the master and four workers announced")
        for i in range(REQUESTS + DOUBLE_POPS):
            if i % 9 == 8:
                double_pops[int(_get(f"{base}/double-pop"))] += 1
            else:
                served[int(_get(f"{base}/pid"))] += 1
        retired = {p for p in served | double_pops if served[p] + double_pops[p] == MAX_REQUESTS}
        assert len(retired) >= 6

        def settled() -> dict[int, dict[str, Any]] | None:
            found = file_sd_targets(targets)
            return found if len(found) == WORKERS + 1 and not retired & set(found) else None

        found = wait_until(settled, timeout=30, what="four live workers, the retired gone")
        time.sleep(2.5)  # every process has written its file since the last request
        on_host = series(_get(host))
        by_worker = _by_worker(on_host)
        _check_live(found, by_worker, master)
        names = {pid: w for w in by_worker if (pid := int(w.split(":")[1])) in retired}
        assert set(names) == retired
        live_worker = next(e["labels"]["worker"] for p, e in found.items() if p != master)
        _check_retired(on_host, names, live_worker, served, double_pops)
        # Every request of the run, counted once, by the process that served it.
        total = sum(
            v for (name, labels), v in on_host.items()
            if name == "ctxtrace_contexts_total" and dict(labels)["kind"] == "request"
        )
        assert total == REQUESTS + DOUBLE_POPS

        # After the retention, the retired workers' series are gone, the live ones stay.
        def retired_gone() -> bool:
            return not set(names.values()) & set(_by_worker(series(_get(host))))

        wait_until(retired_gone, timeout=RETAIN_S + 10, interval=0.5, what="retired series gone")
        left = set(_by_worker(series(_get(host))))
        assert left == {e["labels"]["worker"] for e in found.values()}
    finally:
        stop(process, grace=20, group=True)
    text = log.read_text(errors="replace")
    assert "WORKER TIMEOUT" not in text and "Traceback" not in text, text[-3000:]


def _horses(on_host: Series, main: int) -> list[tuple[int, int, int]]:
    """What each work-horse counted: (app contexts, leaks, escaped accesses), sorted."""
    counted: dict[str, list[int]] = {}
    for (name, labels), value in on_host.items():
        found = dict(labels)
        if int(found["worker"].split(":")[1]) == main:
            continue
        slot = counted.setdefault(found["worker"], [0, 0, 0])
        if name == "ctxtrace_contexts_total" and found.get("kind") == "app":
            slot[0] += int(value)
        elif name == "ctxtrace_anomalies_total" and found.get("anomaly") == "leaked":
            slot[1] += int(value)
        elif name == "ctxtrace_out_of_context_access_total" and (
            found.get("phase"), found.get("outcome")
        ) == ("runtime", "escaped"):
            slot[2] += int(value)
    return sorted((a, b, c) for a, b, c in counted.values())


def test_rq_horses_are_served_after_their_os_exit(tmp_path: Path) -> None:
    """``rq worker`` (a work-horse forked per job, leaving by ``os._exit``): the host's
    address, served by the worker's main process, has each horse's exact counts."""
    first = free_range(1)[0]
    with redis_server(tmp_path) as url:
        connection = redis.Redis.from_url(url)
        try:
            queue = Queue("ctxtrace-host", connection=connection)
            jobs = enqueue_all(queue)
            log = tmp_path / "rq.log"
            process = ctxtrace_run(
                [str(BIN / "rq"), "worker", "--url", url, "ctxtrace-host"], log,
                sets=("prometheus_scrape=host", f"prometheus_port={first}"),
            )
            try:
                def done() -> bool:
                    if process.poll() is not None:
                        pytest.fail(f"rq exited: {log.read_text()[-2000:]}", pytrace=False)
                    finished = queue.finished_job_registry.count
                    return finished + queue.failed_job_registry.count == jobs

                wait_until(done, timeout=60, interval=0.2, what="every job done")
                expected = sorted(c for count, c in RQ_JOBS.values() for _ in range(count))
                host = f"http://127.0.0.1:{first}/metrics"

                def served() -> bool:
                    try:
                        return bool(_horses(series(_get(host)), process.pid) == expected)
                    except OSError:
                        return False

                wait_until(served, timeout=10, interval=0.5, what="every horse's counts served")
            finally:
                stop(process, group=True)
        finally:
            connection.close()


CELERY_TASKS = 8


def test_celery_pool_processes_are_served_through_retirements(tmp_path: Path) -> None:
    """``celery worker`` with a prefork pool whose processes are replaced every 2 tasks:
    the main process's address has every pool process's app contexts, exactly, the
    retired ones' included (flushed as they leave by ``os._exit``)."""
    from celery import Celery  # noqa: PLC0415 - only this test needs the client

    from ..fixtures import celery_tasks  # noqa: PLC0415

    first = free_range(1)[0]
    with redis_server(tmp_path) as url:
        queue = "ctxtrace-host-scrape"
        process = ctxtrace_run(
            [str(BIN / "celery"), "-A", "tests.fixtures.celery_tasks", "worker",
             "--pool=prefork", "--concurrency=2", "--max-tasks-per-child=2",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel=WARNING", "-Q", queue, "-n", f"host-scrape-{first}@127.0.0.1"],
            tmp_path / "celery.log",
            sets=("prometheus_scrape=host", f"prometheus_port={first}"),
            env={celery_tasks.REDIS_ENV: url, celery_tasks.QUEUE_ENV: queue},
        )
        client = Celery("ctxtrace_host_scrape_client", broker=url, backend=url)
        try:
            results = [
                client.send_task("ctxtrace_tests.with_context", queue=queue)
                for _ in range(CELERY_TASKS)
            ]
            for result in results:
                assert result.get(timeout=60) == "celery-shop"
            host = f"http://127.0.0.1:{first}/metrics"

            def counted() -> dict[str, float] | None:
                try:
                    samples = series(_get(host))
                except OSError:
                    return None
                found = {
                    dict(labels)["worker"]: value
                    for (name, labels), value in samples.items()
                    if name == "ctxtrace_contexts_total"
                    and dict(labels).get("app") == "celery-shop"
                    and dict(labels)["kind"] == "app"
                }
                return found if sum(found.values()) == CELERY_TASKS else None

            pools = wait_until(counted, timeout=20, interval=0.5, what="every task's context")
            # Two tasks a process: at least four pool processes served them.
            assert len(pools) >= CELERY_TASKS // 2
            assert all(f":{process.pid}:" not in worker for worker in pools)
        finally:
            client.close()
            stop(process, group=True)
