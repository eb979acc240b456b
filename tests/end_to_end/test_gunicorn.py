"""Real ``gunicorn --preload`` runs: one endpoint per worker, exact totals, worker restarts.

Each run is ``ctxtrace run -- gunicorn ...`` on a free loopback port, with every
worker announcing its ``/metrics`` endpoint in a file_sd folder, and is stopped by
its pid; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .._servers import REPO, ctxtrace_gunicorn, file_sd_targets, run_threads, stop, wait_until
from .._support import line_of


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _scrape(target: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = _get(f"http://{target}/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_each_worker_serves_its_own_exact_metrics(tmp_path: Path) -> None:
    """Two workers, two endpoints found through file_sd, counts that add up exactly."""
    process, base, targets, _log = ctxtrace_gunicorn(
        tmp_path, "tests.fixtures.telemetry_app:app", "-w", "2", "-k", "gthread", "--threads", "4"
    )
    served: Counter[int] = Counter()
    double_pops: Counter[int] = Counter()
    try:
        # The master (ctxtrace run execs gunicorn: same pid) and two workers register.
        def registered() -> dict[int, dict[str, Any]] | None:
            found = file_sd_targets(targets)
            return found if len(found) == 3 else None

        found = wait_until(registered, timeout=30, what="three target files")
        assert process.pid in found
        workers = {pid: entry for pid, entry in found.items() if pid != process.pid}

        def ready() -> bool:
            try:
                served[int(_get(f"{base}/pid"))] += 1
            except OSError:
                return False
            return True

        wait_until(ready, timeout=20, what="gunicorn answering")
        for _ in range(40):
            served[int(_get(f"{base}/pid"))] += 1
        for _ in range(6):
            double_pops[int(_get(f"{base}/double-pop"))] += 1
        assert set(served) | set(double_pops) <= set(workers)

        labels = set()
        for pid, entry in workers.items():
            (target,) = entry["targets"]
            samples = _scrape(target)
            worker = entry["labels"]["worker"]
            labels.add(worker)
            assert worker.endswith(f":{pid}:gunicorn")
            requests = served[pid] + double_pops[pid]
            apps = requests + double_pops[pid]  # Flask's own, plus the one popped twice
            common = {"app": "shop", "worker": worker}
            assert _sample(samples, "ctxtrace_contexts_total", kind="request", **common) == requests
            # The import-time push happened once, in the master: no worker counts it.
            assert _sample(samples, "ctxtrace_contexts_total", kind="app", **common) == apps
            assert _sample(
                samples, "ctxtrace_context_duration_seconds_count", kind="request", **common
            ) == requests
            assert _sample(
                samples, "ctxtrace_context_duration_seconds_count", kind="app", **common
            ) == apps
            assert _sample(
                samples, "ctxtrace_anomalies_total", anomaly="double_pop", kind="app", **common
            ) == double_pops[pid]
            assert _sample(samples, "ctxtrace_contexts_active", kind="request", **common) == 0
        assert len(labels) == 2
        total = sum(served.values()) + sum(double_pops.values())
        assert total == 47

        (master_target,) = found[process.pid]["targets"]
        master = _scrape(master_target)
        master_worker = found[process.pid]["labels"]["worker"]
        assert _sample(
            master, "ctxtrace_contexts_total", kind="app", app="shop", worker=master_worker
        ) == 1
    finally:
        stop(process, grace=20, group=True)
    # Every process removed its own target file on the way out.
    assert sorted(p.name for p in targets.glob("*.json")) == []


# -- worker restarts -----------------------------------------------------------

#: Requests a sync worker serves before gunicorn replaces it (``--max-requests``).
MAX_REQUESTS = 5
WORKERS = 4
CLIENTS = 4
PER_CLIENT = 15
#: Longest any one request may take: a worker stuck after fork would show here or
#: as a live worker that never comes up (below).
REQUEST_TIMEOUT_S = 10.0


def _children(parent: int) -> set[int]:
    """The live (not zombie) child processes of ``parent``, read from /proc (Linux)."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses; the fields after it do not.
        state, ppid = text.rpartition(")")[2].split()[:2]
        if int(ppid) == parent and state != "Z":
            found.add(int(stat.parent.name))
    return found


def _anomaly_lines(log: Path) -> list[dict[str, Any]]:
    """ctxtrace's anomaly lines among everything the server printed."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "anomaly" in record:
            found.append(record)
    return found


def _drive(base: str) -> tuple[Counter[int], float]:
    """``CLIENTS`` threads send ``PER_CLIENT`` requests each to ``/pid``.

    Returns how many requests each process served, and the slowest answer in seconds.
    """
    served: Counter[int] = Counter()
    slowest = 0.0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        nonlocal slowest
        try:
            for _ in range(PER_CLIENT):
                started = time.monotonic()
                pid = int(_get(f"{base}/pid", timeout=REQUEST_TIMEOUT_S))
                with lock:
                    served[pid] += 1
                    slowest = max(slowest, time.monotonic() - started)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    clients = [threading.Thread(target=client, name=f"fork-client-{i}") for i in range(CLIENTS)]
    run_threads(clients, timeout=30, what="clients")
    assert errors == []
    return served, slowest


def _check_worker(entry: dict[str, Any], pid: int, served: int) -> None:
    """A live worker's own endpoint: its own label, its own exact counts, nothing active."""
    (target,) = entry["targets"]
    worker = entry["labels"]["worker"]
    assert re.fullmatch(rf"[^:]+:{pid}:gunicorn", worker)
    samples = _scrape(target)
    # Every series of this endpoint, and its resource, is this worker's own.
    owners = {
        dict(labels).get("worker", dict(labels).get("service_instance_id", worker))
        for _, labels in samples
    }
    assert owners == {worker}
    common = {"app": "shop", "worker": worker}
    assert _sample(samples, "ctxtrace_contexts_total", kind="request", **common) == served
    assert _sample(
        samples, "ctxtrace_context_duration_seconds_count", kind="request", **common
    ) == served
    # The master's import-time context is on this worker's stack (Flask reuses it
    # for every request) but it is not this worker's: not counted, not active.
    assert _sample(samples, "ctxtrace_contexts_total", kind="app", **common) == 0
    for kind in ("app", "request"):
        assert _sample(samples, "ctxtrace_contexts_active", kind=kind, **common) == 0
    anomalies = [v for (name, _), v in samples.items() if name == "ctxtrace_anomalies_total"]
    assert anomalies and sum(anomalies) == 0


def test_preload_worker_restarts_keep_per_worker_series_exact(tmp_path: Path) -> None:
    """--preload, 4 sync workers replaced every 5 requests: no hang, nothing inherited, exact."""
    process, base, targets, log = ctxtrace_gunicorn(
        tmp_path, "tests.fixtures.preload_app:app", "-w", str(WORKERS),
        "--max-requests", str(MAX_REQUESTS), "--max-requests-jitter", "0",
    )
    master = process.pid
    try:
        # The master and the first four workers announce themselves.
        def first_workers() -> dict[int, dict[str, Any]] | None:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited: {log.read_text()[-2000:]}", pytrace=False)
            found = file_sd_targets(targets)
            return found if len(found) == WORKERS + 1 else None

        initial = set(wait_until(first_workers, timeout=30, what="five target files")) - {master}
        served, slowest = _drive(base)
        assert sum(served.values()) == CLIENTS * PER_CLIENT
        assert slowest < REQUEST_TIMEOUT_S
        # A sync worker that served its fifth request exits, and gunicorn forks another.
        exited = {pid for pid, n in served.items() if n == MAX_REQUESTS}
        assert max(served.values()) == MAX_REQUESTS
        assert len(exited) >= (CLIENTS * PER_CLIENT - WORKERS * (MAX_REQUESTS - 1)) // MAX_REQUESTS
        assert initial & exited, "no worker that had announced itself was replaced"

        # Settled: every worker that served its fifth request gone, four live workers,
        # each announced by its own file, no file of a gone one. A retiring worker
        # answers its fifth request before it exits and removes its file, so right
        # after the last answer it can still be a live child with its file: wait for
        # it to leave (bounded) rather than take it for one of the four.
        seen: list[tuple[set[int], set[int]]] = []

        def settled() -> tuple[set[int], dict[int, dict[str, Any]]] | None:
            live, found = _children(master), file_sd_targets(targets)
            seen[:] = [(live, set(found))]
            if live & exited or len(live) != WORKERS or set(found) != live | {master}:
                return None
            return live, found

        try:
            live, found = wait_until(
                settled, timeout=20, what="four announced live workers, the retired ones gone"
            )
        except pytest.fail.Exception:
            ((live, announced),) = seen
            pytest.fail(
                f"not settled: live workers {sorted(live)}, of which retired (still running)"
                f" {sorted(live & exited)}; announced {sorted(announced - {master})}",
                pytrace=False,
            )
        # Every worker that served fewer is still the one serving: none died otherwise.
        assert set(served) - exited <= live
        for pid in live:
            _check_worker(found[pid], pid, served[pid])

        # Positive control: ctxtrace saw the context live in the master before the forks.
        (master_target,) = found[master]["targets"]
        master_worker = found[master]["labels"]["worker"]
        assert _sample(
            _scrape(master_target), "ctxtrace_contexts_active",
            kind="app", app="shop", worker=master_worker,
        ) == 1
    finally:
        stop(process, grace=20, group=True)
    text = log.read_text(errors="replace")
    assert "WORKER TIMEOUT" not in text and "Traceback" not in text, text[-3000:]
    # The one anomaly of the whole run: the context the master's import pushed, said
    # once, as a warning (no leak at exit besides). No worker, exiting after its fifth
    # request or at the stop, reported it.
    (leak,) = _anomaly_lines(log)
    assert (leak["pid"], leak["anomaly"], leak["reason"]) == (master, "long_lived", "import")
    assert leak["level"] == "warning"
    fixture = REPO / "tests" / "fixtures" / "preload_app.py"
    assert leak["site"] == f"{fixture}:{line_of(str(fixture), 'import-push')}"
    assert sorted(p.name for p in targets.glob("*.json")) == []


# -- gthread: requests on a pool --------------------------------------------------


def test_gthread_pool_threads_report_leaks_and_stale_contexts_by_unit(tmp_path: Path) -> None:
    """gthread serves requests on a ThreadPoolExecutor: each request and each task of the
    app's own pool is a unit; a leak is its unit's, and the next unit on the thread finds it
    stale, named after that request's endpoint or that task's function, never gthread's."""
    process, base, _targets_dir, log = ctxtrace_gunicorn(
        tmp_path, "tests.fixtures.gthread_app:app", "-w", "1", "-k", "gthread", "--threads", "1",
    )
    try:

        def ready() -> bool:
            try:
                return _get(f"{base}/") == "ok"
            except OSError:
                return False

        wait_until(ready, timeout=30, what="gunicorn's gthread worker")
        assert _get(f"{base}/") == "ok"
        assert _get(f"{base}/task/leak") == "task leaked"
        # Flask <= 3.1 hands the leaked context's g to the next task on that thread.
        assert _get(f"{base}/task/clean") in ("alice", "nobody")
        assert _get(f"{base}/leak") == "leaked"
        assert _get(f"{base}/") == "ok"
    finally:
        stop(process, grace=20, group=True)
    seen = sorted(
        (line["anomaly"], line.get("unit"), line.get("reason"))
        for line in _anomaly_lines(log)
    )
    module = "tests.fixtures.gthread_app"
    assert seen == [
        ("leaked", f"executor:{module}.leave_pushed", "unit_end"),
        ("leaked", "request:leak", "unit_end"),
        ("stale_context", f"executor:{module}.read_user", None),
        ("stale_context", "request:index", None),
    ], log.read_text()[-3000:]
