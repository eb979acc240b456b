"""The README's commands work as written: the demo, and the report on the demo's log.

The install half of the set-up commands (venv, pip) is what this suite already runs in; the
test command is this suite itself. Everything after the install is run here, literally, with
bash, in an empty folder, as a newcomer would type it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxtrace.commands.report import model as report_model
from ctxtrace.commands.report import sources as report_sources
from ctxtrace.example import SCENARIOS
from ctxtrace.telemetry.pids import alive

from .._servers import REPO, wait_until

README = REPO / "README.md"
BIN = Path(sys.executable).parent
DEMO_SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip"
    " && pip install -q -e '.[demo]' && ctxtrace demo"
)
TEST_SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip"
    " && pip install -q -e '.[test]' && pytest -n 4 --dist loadfile"
)
SITE = re.compile(r"[\w./-]+\.py:\d+")


def _shell_lines() -> list[str]:
    """Every line of the README's ``sh`` code blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _env() -> dict[str, str]:
    # As from a fresh shell with the venv active: this interpreter's scripts first, no
    # ctxtrace or OpenTelemetry settings inherited from the test run.
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CTXTRACE_", "OTEL_")) and k != "PYTHONPATH"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _bash(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def test_readme_gives_both_setup_commands() -> None:
    """The two set-up commands appear exactly (CI runs the second one, .ci/run)."""
    lines = _shell_lines()
    assert DEMO_SETUP in lines
    assert TEST_SETUP in lines
    assert TEST_SETUP in (REPO / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """``ctxtrace demo`` as the README's first command ends, in an empty folder."""
    command = DEMO_SETUP.rsplit(" && ", 1)[1]
    assert command == "ctxtrace demo"
    cwd = tmp_path_factory.mktemp("newcomer")
    started = time.monotonic()
    result = _bash(command, cwd, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert elapsed < 60, f"the demo took {elapsed:.0f} s"
    (out,) = cwd.glob("ctxtrace-demo-*")
    yield out, result.stdout


def test_demo_reports_every_seeded_fault_with_its_line(demo: tuple[Path, str]) -> None:
    """Each scenario's anomalies are named with a file:line of the example app, and a fix."""
    _out, printed = demo
    checklist = printed[printed.index("Seeded faults"):]
    for scenario in SCENARIOS:
        for anomaly in scenario.anomalies:
            line = next(
                (
                    row for row in checklist.splitlines()
                    if row.split()[:3] == ["[x]", scenario.id, anomaly]
                ),
                None,
            )
            assert line is not None, f"{scenario.id}: {anomaly} not reported\n{checklist}"
            site = SITE.search(line)
            assert site is not None and site.group().startswith("ctxtrace/example/"), line
        assert scenario.fix in " ".join(printed.split()), scenario.id
    assert "[ ]" not in checklist
    # Per worker: two gunicorn workers with contexts by kind and lifetimes.
    workers = re.findall(r"^\S+:(\d+):gunicorn  \(metrics and log\)$", printed, re.M)
    assert len(workers) == 2
    assert len(re.findall(r"^  lifetime   app: p50 .+ request: p50 ", printed, re.M)) == 2


def test_demo_writes_log_metrics_and_report(demo: tuple[Path, str]) -> None:
    """The output folder has the JSON log, a metrics snapshot per process and the report."""
    out, _printed = demo
    lines = (out / "ctxtrace.jsonl").read_text().splitlines()
    events = {json.loads(line)["event"] for line in lines}
    names = {a for s in SCENARIOS for a in s.anomalies}
    assert {f"ctxtrace.{name}" for name in names} <= events
    snapshots = sorted((out / "metrics").glob("*.prom"))
    assert len(snapshots) == 3  # gunicorn's master and two workers
    assert any("ctxtrace_anomalies_total{" in p.read_text() for p in snapshots)
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    for name in names:
        assert name in page
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    # Every process stopped and removed its file_sd target file.
    assert list((out / "targets").glob("*.json")) == []


def test_demo_logs_and_metrics_count_the_same(demo: tuple[Path, str]) -> None:
    """The demo runs on the default rate limit, and still each worker's log counts every
    anomaly its metrics counted: held-back lines are summed, the last window written at exit."""
    out, _printed = demo
    lines = [json.loads(line) for line in (out / "ctxtrace.jsonl").read_text().splitlines()]
    assert any(line.get("suppressed_since_last") for line in lines), "no line was rate-limited"
    report = report_model.Report()
    for snapshot in sorted((out / "metrics").glob("*.prom")):
        report_sources.add_samples(report, report_sources.samples_from_text(snapshot.read_text()))
    report_sources.add_log_file(report, out / "ctxtrace.jsonl")
    compared = 0
    for worker, stats in report.workers.items():
        if stats.has_metrics:
            assert stats.log_anomalies == stats.metric_anomalies, worker
            compared += sum(stats.metric_anomalies.values())
    assert compared > 30


def test_report_commands_on_the_demo_log(demo: tuple[Path, str]) -> None:
    """The README's ``ctxtrace report --log ctxtrace-demo-*/...`` lines run as written."""
    out, _printed = demo
    commands = [
        line for line in _shell_lines() if line.startswith("ctxtrace report --log ctxtrace-demo-")
    ]
    assert commands
    for command in commands:
        result = _bash(command, out.parent, timeout=60)
        assert result.returncode == 0, result.stderr[-3000:]
        html_path = out.parent / command.split("--out ", 1)[1].split()[0]
        page = html_path.read_text()
        for scenario in SCENARIOS:
            for anomaly in scenario.anomalies:
                assert anomaly in page
        assert "ctxtrace/example/worker.py:" in page
        assert "ctxtrace/example/worker.py:" in result.stdout


def _pids_in(log: Path) -> set[int]:
    """gunicorn's master and workers, as its own log lines name them."""
    text = log.read_text(errors="replace")
    return {int(pid) for pid in re.findall(r"^\[[^\]]+\] \[(\d+)\] \[INFO\]", text, re.M)}


def test_ctrl_c_stops_everything_and_still_reports(tmp_path: Path) -> None:
    """SIGINT during the load: the demo stops its server and command by pid, reports, exits 0."""
    out = tmp_path / "demo"
    process = subprocess.Popen(
        [str(BIN / "ctxtrace"), "demo", "--out", str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: _server_answering(out), timeout=30, what="the demo's server")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr[-3000:]
    assert "interrupted" in stderr
    assert "(interrupted)" in stdout
    pids = _pids_in(out / "server.log")
    assert len(pids) >= 3
    assert not [pid for pid in pids if alive(pid)]


def _server_answering(out: Path) -> bool:
    log = out / "server.log"
    return log.exists() and "Booting worker" in log.read_text(errors="replace") and any(
        (out / "targets").glob("*gunicorn.json")
    )


def test_demo_without_gunicorn_uses_werkzeug(tmp_path: Path) -> None:
    """The fallback server (a werkzeug thread pool) shows every seeded fault as well."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(BIN / "ctxtrace"), "demo", "--server", "werkzeug", "--out", str(out)],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Every seeded fault was reported" in result.stdout
    assert "werkzeug" in result.stdout
