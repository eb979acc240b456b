"""A real Prometheus scraping one host's one address while gunicorn retires workers.

``ctxtrace run -- gunicorn --preload --workers 4 --max-requests 5`` (scrape host, the
default under ``ctxtrace run``, retention cut to a few seconds) and Prometheus (the
shipped config, 1 s intervals) with the host's address as its one target. What the
retention semantics promise, checked in Prometheus itself:

- every request counted once: summed over workers, the largest value each series
  reached is the number of requests sent, retired workers included (their last counts,
  written at exit, were served long enough to be scraped);
- no series ever went down: dropping a retired worker's series after the retention is
  not a counter reset (``resets`` is 0), and ``sum(increase(...))`` is never negative;
- after the retention only the live processes have series.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # at run time the module comes from the `livestack` fixture
    from livestack import Stack

WORKERS = 4
MAX_REQUESTS = 5
REQUESTS = 40
RETAIN_S = 8
CTXTRACE = "import sys; from ctxtrace.cli import main; sys.exit(main())"
REPO = Path(__file__).resolve().parents[2]
REQUESTS_BY_WORKER = 'ctxtrace_contexts_total{job="ctxtrace", kind="request"}'
#: One series per process served (a worker has no request series before its first request).
PROCESSES = 'process_start_time_seconds{job="ctxtrace"}'


def _scalar(stack: Stack, expr: str) -> float:
    (sample,) = stack.query(expr)
    return float(sample["value"][1])


def test_retired_workers_count_once_and_leave(
    livestack: ModuleType,
    start_stack: Callable[..., AbstractContextManager[Stack]],
    missing: Callable[[str], None],
) -> None:
    """Exact totals across retirements, no reset, a bounded set of series afterwards."""
    try:
        import gunicorn  # noqa: F401, PLC0415 - probing only
    except ImportError:
        missing("gunicorn is not installed; install the test extra: pip install -e '.[test]'")
    with start_stack("host-scrape", "1s") as stack:
        folder = stack.folder
        port, metrics = livestack.free_port(), livestack.free_port()
        # The host's one address is the job's one target (honor_labels keeps `worker`).
        (folder / "targets" / "host.json").write_text(
            json.dumps([{"targets": [f"127.0.0.1:{metrics}"]}])
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
        env["PYTHONPATH"] = str(REPO)
        command = [
            sys.executable, "-c", CTXTRACE, "run",
            f"--set=prometheus_port={metrics}", f"--set=prometheus_retain={RETAIN_S}", "--",
            sys.executable, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
            "--max-requests", str(MAX_REQUESTS), "--max-requests-jitter", "0",
            "--graceful-timeout", "5", "--no-control-socket",
            "--bind", f"127.0.0.1:{port}", "tests.fixtures.telemetry_app:app",
        ]
        with livestack.Processes() as processes:
            log = folder / "gunicorn.log"
            processes.start(command, log, cwd=REPO, group=True, env=env)
            logs = [*stack.logs, log]
            livestack.wait_for(
                "the master and four workers scraped",
                lambda: len(stack.query(PROCESSES)) == WORKERS + 1, logs, 30,
            )
            started = time.time()
            pids = set()
            for _ in range(REQUESTS):
                pids.add(livestack.get_json(f"http://127.0.0.1:{port}/pid"))
                time.sleep(0.1)
            assert len(pids) > WORKERS  # workers were retired and replaced
            livestack.wait_for(
                "the retired workers' series gone",
                lambda: len(stack.query(PROCESSES)) == WORKERS + 1, logs, RETAIN_S + 20,
            )
            window = f"{int(time.time() - started) + 30}s"
            assert _scalar(
                stack, f"sum(max_over_time({REQUESTS_BY_WORKER}[{window}]))"
            ) == REQUESTS
            assert _scalar(stack, f"sum(resets({REQUESTS_BY_WORKER}[{window}]))") == 0
            increases = stack.query_range(
                f"sum(increase({REQUESTS_BY_WORKER}[10s]))", started, time.time()
            )
            values = [float(v) for series in increases for _, v in series["values"]]
            assert values and min(values) >= 0
            workers = {s["metric"]["worker"] for s in stack.query(PROCESSES)}
            assert len(workers) == WORKERS + 1
            assert len({s["metric"]["worker"] for s in stack.query(
                f"max_over_time({REQUESTS_BY_WORKER}[{window}])"
            )}) > WORKERS + 1
            if not any(w.endswith(":gunicorn-master") for w in workers):
                pytest.fail(f"no master among {workers}", pytrace=False)
