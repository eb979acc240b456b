"""A shortened soak (benchmarks/soak.py): 2 x 10^5 contexts, 1 % leaked, a ledger cap of 300.

The soak runs in a process of its own, so its resident memory is its own; the
full run is ``python benchmarks/soak.py`` (10^6 contexts, cap 1000).
"""

from __future__ import annotations

import contextvars
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from ctxtrace import _agent

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


@pytest.fixture(scope="module")
def soak() -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable, str(REPO / "benchmarks" / "soak.py"), "--json",
            "--contexts", "200000", "--cap", "300", "--sweep-every", "20000",
            "--sample-every", "5000",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))},
    )
    assert completed.stdout, completed.stderr[-3000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    result["exit_code"] = completed.returncode
    return result


def test_the_soak_passes_its_own_checks(soak: dict[str, Any]) -> None:
    """The script's checks: cap, memory, counters, reports."""
    assert soak["failures"] == []
    assert soak["exit_code"] == 0


def test_tracked_contexts_stay_at_the_cap(soak: dict[str, Any]) -> None:
    """The ledger fills up to its cap and never past it; what it turns away is counted."""
    assert max(s["tracked"] for s in soak["samples"]) == soak["cap"] == 300
    assert soak["dropped"] > 0
    assert soak["pushes_tracked"] + soak["dropped"] == soak["pushes_made"] == 200_000


def test_memory_is_flat_after_the_warm_up(soak: dict[str, Any]) -> None:
    """Resident memory and the collector's objects do not grow once the cap is reached."""
    assert soak["peak_rss_after_warmup"] - soak["warmup_rss"] < 4 * MIB
    assert soak["peak_objects_after_warmup"] - soak["warmup_objects"] < 5_000


def test_every_tracked_leak_in_a_unit_is_reported_once(soak: dict[str, Any]) -> None:
    """Leaks in units are reported when the unit ends, once each, cap or no cap."""
    tracked = soak["tracked_leaks"]
    assert soak["reported"]["leaked:unit_end"] == tracked["live_thread"] + tracked[
        "garbage_in_unit"
    ]
    assert soak["pops_tracked"] == soak["pushes_tracked"] - sum(tracked.values())


def test_a_collected_leak_is_reported_even_when_its_id_is_reused(instrumented: Any) -> None:
    """Leaks outside any unit, collected before a sweep: each is still reported once."""
    recorder = instrumented(sweep_interval=3600)
    agent = _agent.current()
    assert agent is not None
    app = Flask("reuse")
    for _ in range(20):
        # The context is garbage once the throwaway Context is; the next one, the same
        # size, usually lands at the same address, so it has the same id.
        contextvars.Context().run(lambda: app.app_context().push())
        gc.collect()
        with app.app_context():
            pass
    gc.collect()
    agent.sweep()
    assert len(recorder.anomalies("leaked")) == 20
