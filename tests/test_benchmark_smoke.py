"""The overhead benchmark still runs end to end (a short smoke; no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "overhead.py"


@pytest.mark.skipif(sys.platform != "linux", reason="the memory part reads /proc")
def test_overhead_benchmark_smoke(tmp_path: Path) -> None:
    """``overhead.py --smoke`` runs every part and writes a table with every section."""
    out = tmp_path / "performance.md"
    env = dict(os.environ)
    env.pop("CTXTRACE_METRICS", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for heading in (
        "## Budget (issue 7)",
        "## Per operation",
        "## Instructions per trivial request (callgrind)",
        "## gunicorn, 2 sync workers, loopback",
        "## Memory over 10,000 contexts, 1 % leaked",
    ):
        assert heading in text, heading
    for row in ("| request | bare |", "| request | ctxtrace |", "| push_pop | ctxtrace |"):
        assert row in text, row
