"""The overhead benchmark still runs end to end (a short smoke; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


@pytest.mark.skipif(sys.platform != "linux", reason="the memory part reads /proc")
def test_overhead_benchmark_smoke(tmp_path: Path) -> None:
    """``overhead.py --smoke`` runs every part and writes a table with every section."""
    out = tmp_path / "performance.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for heading in (
        "## Budget (issue 14)",
        "## Per operation",
        "## Instructions per trivial request (callgrind)",
        "## gunicorn, 2 sync workers, loopback",
        "## Memory over 20,000 contexts, 1 % leaked",
    ):
        assert heading in text, heading
    rows = [
        f"| {workload} | {config} |"
        for workload in ("request", "wsgi_app", "request_g_url_for")
        for config in ("bare", "ctxtrace", "spans_all", "all_options", "otel", "otel_unsampled",
                       "otel_ctxtrace")
    ]
    rows += [
        f"| {workload} | {config} |"
        for workload in ("push_pop", "proxy_access", "failed_access")
        for config in ("bare", "ctxtrace", "spans_all", "all_options")
    ]
    if importlib.util.find_spec("sentry_sdk") is not None:
        rows += ["| request | sentry |", "| request_g_url_for | sentry |"]
    rows += ["| bare | ", "| ctxtrace | "]  # gunicorn
    if shutil.which("valgrind"):
        # The instruction counts' row (bare, ctxtrace) and their budget line.
        row = r"^\| wsgi_app \| ctxtrace \| [\d,]+ \| [+-][\d,]+ \|"
        assert re.search(row, text, re.M), "callgrind"
        rows += ["app.wsgi_app(...), ctxtrace <= 5 % over bare (instructions)"]
        # A whole request in a gunicorn worker under callgrind, and its budget line.
        assert re.search(r"^\| gunicorn \| ctxtrace \| [\d,]+ \| [+-][\d,]+ \|", text, re.M)
        rows += ["gunicorn sync worker, instructions per request, ctxtrace within 2 % of bare"]
    for row in rows:
        assert row in text, row
    assert "| 0 | 0-0 |" not in text, "a gunicorn configuration served nothing"
    # The workers' CPU per request is measured (a positive number of microseconds).
    cpu_row = r"^\| gunicorn workers' CPU per request.*\| [1-9]\d* vs [1-9]\d* us"
    assert re.search(cpu_row, text, re.M)
