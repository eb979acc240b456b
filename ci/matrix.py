"""ctxtrace's core tests against each supported Flask: the newest 2.3.x, 3.0.x, 3.1.x and main.

    python ci/matrix.py                      # every target, in a temporary folder
    python ci/matrix.py --only 3.1 main      # some of them
    python ci/matrix.py --workdir ~/.cache/ctxtrace-matrix --write-doc

Each target gets a virtual environment of its own with that Flask, pytest,
hypothesis and ctxtrace installed editable from this repository; pip's cache
makes the installs quick after the first run, and with ``--workdir`` an
environment that already has the right Flask is reused as it is. ``main`` is
Flask's next release, which is on no package index: it is built from a local
bare clone of pallets/flask (``--flask-git``, default /work/.mirror/pallets+flask/repo)
exported with ``git archive`` into the work folder, never into this repository.
Without that clone the target is reported as not run.

The tests are the core suite (``CORE_TESTS``), run from the repository root
with its own pytest settings (strict markers and config, warnings as errors),
``--jobs`` targets at a time. They run with ``CTXTRACE_METRICS=none``: the
matrix is about Flask, and a Prometheus endpoint started and stopped by every
``instrument()`` of the property-based tests costs minutes. Exit status 1 when
any target fails; ``--write-doc`` records the results in docs/compatibility.md,
between its ``matrix`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Run as a script: this folder is on sys.path, so the sibling script is importable.
from flask_suite import DOC, export_flask_main, write_doc

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
DEFAULT_FLASK_GIT = Path("/work/.mirror/pallets+flask/repo")
#: Target name -> pip requirement for Flask (``main`` is built from the clone).
TARGETS = {
    "2.3": "flask>=2.3,<2.4",
    "3.0": "flask>=3.0,<3.1",
    "3.1": "flask>=3.1,<3.2",
    "main": None,
}
CORE_TESTS = (
    "tests/core/test_seed_causes.py",
    "tests/core/test_not_flagged.py",
    "tests/core/test_ledger.py",
    "tests/core/test_ledger_model.py",
    "tests/test_instrument.py",
    "tests/core/test_fail_open.py",
    "tests/core/test_outcomes.py",
    "tests/core/test_sites.py",
    "tests/core/test_hooks_other_signatures.py",
    "tests/telemetry/test_logs.py",
    "tests/test_config.py",
    "tests/test_bad_input.py",
    "tests/test_security.py",
    "tests/end_to_end/test_soak.py",
)
RUN_TIMEOUT_S = 900


@dataclass
class Outcome:
    target: str
    flask: str = "-"
    werkzeug: str = "-"
    counts: str = ""
    seconds: float = 0.0
    ok: bool = False
    note: str = ""


def _run(cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        list(cmd), text=True, capture_output=True, check=False, **kwargs  # type: ignore[call-overload]
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise RuntimeError(f"failed ({completed.returncode}): {' '.join(map(str, cmd))}")
    return completed


def _versions(python: Path) -> tuple[str, str]:
    out = _run(
        [
            str(python), "-c",
            "import importlib.metadata as m; print(m.version('flask'), m.version('werkzeug'))",
        ]
    ).stdout.split()
    return out[0], out[1]


def _environment(work: Path, target: str, requirement: str | Path) -> Path:
    """A venv with this Flask and ctxtrace; reused when it already has that Flask."""
    venv = work / f"venv-flask-{target}"
    python = venv / "bin" / "python"
    stamp = venv / "ctxtrace-matrix.txt"
    if stamp.exists() and stamp.read_text() == str(requirement):
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)])
    # One resolver run: Flask as asked (a local folder for main), ctxtrace on top of it.
    _run(
        [
            str(python), "-m", "pip", "install", "-q", str(requirement), "-e", str(REPO),
            # The redis client: tests/_servers.py, shared by the core tests, imports it.
            "pytest>=8", "hypothesis>=6.100", "redis>=5",
        ]
    )
    stamp.write_text(str(requirement))
    return python


def _counts(junit: Path) -> tuple[str, bool]:
    tally = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    for case in ET.parse(junit).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                xfail = (child.get("type") or "") == "pytest.xfail"
                outcome = "xfailed" if xfail else "skipped"
            elif child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
        tally[outcome] += 1
    text = ", ".join(f"{n} {k}" for k, n in tally.items() if n)
    return text, tally["failed"] == 0 and tally["error"] == 0


def run_target(work: Path, target: str, tests: Sequence[str], git_dir: Path) -> Outcome:
    outcome = Outcome(target)
    started = time.monotonic()
    requirement: str | Path
    if TARGETS[target] is None:
        if not (git_dir / "HEAD").exists():
            outcome.note = f"not run: no clone of pallets/flask at {git_dir}"
            return outcome
        requirement, outcome.note = export_flask_main(work, git_dir)
    else:
        requirement = str(TARGETS[target])
    try:
        python = _environment(work, target, requirement)
    except RuntimeError as exc:
        outcome.note = f"could not install: {exc}"
        return outcome
    outcome.flask, outcome.werkzeug = _versions(python)
    junit = work / f"junit-{target}.xml"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CTXTRACE_", "OTEL_", "PYTHONPATH", "PYTEST_ADDOPTS"))
    }
    env["CTXTRACE_METRICS"] = "none"
    completed = subprocess.run(
        [
            str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit}", *tests,
        ],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=RUN_TIMEOUT_S, check=False,
    )
    (work / f"pytest-{target}.log").write_text(completed.stdout + completed.stderr)
    outcome.seconds = time.monotonic() - started
    if not junit.exists():
        outcome.note = (outcome.note + "; " if outcome.note else "") + "pytest did not run"
        return outcome
    outcome.counts, outcome.ok = _counts(junit)
    outcome.ok = outcome.ok and completed.returncode == 0
    if not outcome.ok:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", completed.stdout, re.MULTILINE)
        outcome.note = (outcome.note + "; " if outcome.note else "") + "failed: " + ", ".join(
            failed[:5]
        )
    return outcome


def table(outcomes: Sequence[Outcome], tests: Sequence[str]) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"Last run {today} with Python {sys.version.split()[0]} (`python ci/matrix.py`): "
        f"{', '.join(Path(t).name for t in tests)}.",
        "",
        "| target | Flask | Werkzeug | result | tests | time | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        result = "pass" if o.ok else ("not run" if not o.counts else "FAIL")
        lines.append(
            f"| {o.target} | {o.flask} | {o.werkzeug} | {result} | {o.counts or '-'} | "
            f"{o.seconds:.0f} s | {o.note} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) environments here")
    parser.add_argument("--flask-git", type=Path, default=DEFAULT_FLASK_GIT)
    parser.add_argument("--tests", nargs="+", default=list(CORE_TESTS))
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once")
    parser.add_argument("--write-doc", action="store_true", help=f"record results in {DOC}")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctxtrace-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def one(target: str) -> Outcome:
        outcome = run_target(work, target, args.tests, args.flask_git)
        print(
            f"{target}: Flask {outcome.flask}: {outcome.counts or '-'} "
            f"({outcome.seconds:.0f} s) {outcome.note}",
            flush=True,
        )
        return outcome

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(one, args.only))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = table(outcomes, args.tests)
    print(text)
    if args.write_doc:
        write_doc(text, BEGIN, END)
    total = time.monotonic() - started
    failed = [o.target for o in outcomes if not o.ok and o.counts]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'OK'} ({total:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
