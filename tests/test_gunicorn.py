"""A real ``gunicorn --preload -w 2 -k gthread`` run: one endpoint per worker, exact totals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ._servers import REPO, free_port, stop, wait_until

BIN = Path(sys.executable).parent


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _targets(folder: Path) -> dict[int, dict[str, Any]]:
    """The file_sd entries in ``folder``, by the pid of the worker they name."""
    found: dict[int, dict[str, Any]] = {}
    for path in folder.glob("*.json"):
        try:
            (entry,) = json.loads(path.read_text())
        except (ValueError, OSError):
            continue  # being written
        found[int(entry["labels"]["worker"].split(":")[1])] = entry
    return found


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
    port, targets, log = free_port(), tmp_path / "targets", tmp_path / "gunicorn.log"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CTXTRACE_", "OTEL_")) and k != "PYTHONPATH"
    }
    command = [
        str(BIN / "ctxtrace"), "run",
        "--set", "prometheus_port=0", "--set", f"prometheus_targets_dir={targets}",
        "--",
        str(BIN / "gunicorn"), "--preload", "-w", "2", "-k", "gthread", "--threads", "4",
        "--no-control-socket", "--graceful-timeout", "10", "-b", f"127.0.0.1:{port}",
        "tests.fixtures.telemetry_app:app",
    ]
    base = f"http://127.0.0.1:{port}"
    served: Counter[int] = Counter()
    double_pops: Counter[int] = Counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # The master (ctxtrace run execs gunicorn: same pid) and two workers register.
        def registered() -> dict[int, dict[str, Any]] | None:
            found = _targets(targets)
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
