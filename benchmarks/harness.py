"""A small benchmark harness: each (configuration, workload) in a fresh process, interleaved.

Wall-clock numbers on a shared 2-core machine are noisy, so every cell runs in
its own process, configurations alternate within each round, and the report
gives medians with min-max and the ratio to bare Flask measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Setup = Callable[[], None]
Workload = Callable[[int], float]


@dataclass(frozen=True)
class Cell:
    config: str
    workload: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_loop(body: Callable[[], object], loops: int) -> float:
    """Nanoseconds per call of ``body``, best of three batches (the least disturbed)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for _ in range(loops):
            body()
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best


def run_cells(
    script: str, configs: Sequence[str], workloads: Sequence[str], rounds: int, loops: int
) -> list[Cell]:
    """Run ``script --worker CONFIG WORKLOAD LOOPS`` per cell, ``rounds`` times, interleaved."""
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for workload in workloads:
            for config in configs:
                out = subprocess.run(
                    [sys.executable, script, "--worker", config, workload, str(loops)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                samples.setdefault((config, workload), []).append(json.loads(out)["ns"])
    return [Cell(c, w, tuple(v)) for (c, w), v in samples.items()]


def report(cells: list[Cell], baseline: str) -> str:
    """A Markdown table: median (min-max) per cell and the ratio to the baseline config."""
    lines = [
        "| workload | configuration | median | min-max | vs bare |",
        "|---|---|---|---|---|",
    ]
    base = {c.workload: c.median for c in cells if c.config == baseline}
    for cell in cells:
        ratio = cell.median / base[cell.workload] if cell.workload in base else float("nan")
        delta = cell.median - base.get(cell.workload, cell.median)
        lines.append(
            f"| {cell.workload} | {cell.config} | {cell.median / 1000:.2f} us "
            f"| {min(cell.samples) / 1000:.2f}-{max(cell.samples) / 1000:.2f} us "
            f"| {ratio:.3f} ({delta:+.0f} ns) |"
        )
    return "\n".join(lines)
