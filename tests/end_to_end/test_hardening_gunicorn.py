"""gunicorn's master has a target of its own, labelled as the master (issue 16, item 10).

Under ``ctxtrace run`` the master starts as a plain process; once it has loaded
gunicorn's arbiter its label (and its file_sd target file) say
``gunicorn-master``, it serves what it counted while importing the app with
``--preload``, and its workers are ``gunicorn``. No target says ``process``.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .._servers import REPO, checkout_env, file_sd_targets, free_port, stop, wait_until

BIN = Path(sys.executable).parent


def test_the_master_is_labelled_as_the_master(tmp_path: Path) -> None:
    """One worker: two targets, ``...:gunicorn-master`` (with the import-time push) and
    ``...:gunicorn``; none labelled ``process``."""
    port, targets = free_port(), tmp_path / "targets"
    env = checkout_env()
    command = [
        str(BIN / "ctxtrace"), "run",
        "--set", "prometheus_port=0", "--set", f"prometheus_targets_dir={targets}",
        "--",
        str(BIN / "gunicorn"), "--preload", "-w", "1", "--no-control-socket",
        "--graceful-timeout", "10", "-b", f"127.0.0.1:{port}", "tests.fixtures.telemetry_app:app",
    ]
    with open(tmp_path / "gunicorn.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        def two() -> dict[int, dict[str, Any]] | None:
            found = file_sd_targets(targets)
            labels = [e["labels"]["worker"] for e in found.values()]
            return found if len(found) == 2 and all(":process" not in x for x in labels) else None

        found = wait_until(two, timeout=30, what="the master's and the worker's targets")
        master = found[process.pid]["labels"]["worker"]
        assert master.endswith(f":{process.pid}:gunicorn-master")
        (worker_pid,) = set(found) - {process.pid}
        assert found[worker_pid]["labels"]["worker"].endswith(f":{worker_pid}:gunicorn")
        assert [p for p in targets.glob("*.json") if "_process" in p.name] == []
        (target,) = found[process.pid]["targets"]
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        key = ("ctxtrace_contexts_total", (("app", "shop"), ("kind", "app"), ("worker", master)))
        assert samples.get(key) == 1  # the import-time push, counted in the master
    finally:
        stop(process, grace=20, group=True)
    assert sorted(p.name for p in targets.glob("*.json")) == []
