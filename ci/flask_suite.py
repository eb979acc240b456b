"""Run Flask's own test suite, and extensions' suites, bare and under ctxtrace: same outcomes?

    python ci/flask_suite.py --flask --extension flask-sqlalchemy --extension flask-login

For each suite: download the sdist (Flask: the version installed here), unpack it
in a temporary folder, and run its tests twice in one fresh virtual environment
(``pytest<9``, asgiref, python-dotenv, that Flask, ctxtrace from this repository
and the extensions with their test dependencies): once bare, once with
``-p ctxtrace_under_test`` (ci/ctxtrace_under_test.py), which turns ctxtrace on
process-wide with every detector and writes every event to a JSON-lines file.

Fails (exit 1) when any test id has another outcome, or another failure message,
in the instrumented run than in the bare one, or when a positive control fails:
the instrumented run recorded no pushes, ctxtrace counted an internal error, or
the expected anomalies are missing. Flask's suite never pops in the wrong order,
so a canary file (ci/suite_canary.py) is added to every suite, in both runs:
its wrong-order pop must be a ``wrong_pop`` and its thread leak a ``leaked``.
Flask's own tests that call a proxy with no context must show up as
``out_of_context_access``.

A third run turns on ctxtrace's own pytest plugin (``--ctxtrace``), as a user
would: it fails a test that leaks a context or lets an out-of-context access
escape. A third-party suite passes its proxy checks inside ``pytest.raises``,
so the only test id allowed another outcome there is the canary's thread leak,
and it must get one (the plugin's positive control).

``--flask-git DIR`` also runs the suite of Flask's next release, exported from a
local bare clone of pallets/flask (it is on no package index), in an environment
of its own with that Flask. pip's cache makes later runs quick; ``--keep``
leaves the folder for a look; ``--write-doc`` records the results in
docs/compatibility.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CI = Path(__file__).resolve().parent
DOC = REPO / "docs" / "compatibility.md"
BEGIN, END = "<!-- suites:begin -->", "<!-- suites:end -->"
CANARY = "test_ctxtrace_canary.py"
#: The one test id the pytest plugin must fail (and the only one it may).
CANARY_LEAK_TEST = "test_ctxtrace_canary_thread_leak"
#: Per pytest run; Flask's suite takes about 3 s here, Flask-SQLAlchemy's about 5 s.
RUN_TIMEOUT_S = 300
#: The suite's tests must not find ctxtrace's own pytest plugin (it is inert, but
#: the bare run should not even import ctxtrace); no cache files in the sdist.
PYTEST_ARGS = ("-p", "no:ctxtrace", "-p", "no:cacheprovider", "-q", "-rfE")


@dataclass(frozen=True)
class Suite:
    """A project whose sdist ships a runnable test suite."""

    name: str
    version: str
    #: Extra packages its tests need (what its requirements/tests.txt lists).
    test_deps: tuple[str, ...] = ()
    #: Its own tests that use a proxy with no context (pytest.raises around it).
    expected_accesses: frozenset[str] = frozenset()
    note: str = ""


EXTENSIONS: dict[str, Suite] = {
    "flask-sqlalchemy": Suite(
        "flask-sqlalchemy",
        "3.1.1",
        # 3.1.1's tests mix dataclass bases in a way SQLAlchemy 2.1 rejects.
        test_deps=("sqlalchemy>=2.0.16,<2.1",),
        expected_accesses=frozenset(
            f"tests/test_session.py::test_scope[{p}]"
            for p in ("Model", "db1", "db2", "db3", "db4")
        ),
        note="every test pushes an app context; sessions are scoped by it",
    ),
    "flask-login": Suite(
        "flask-login",
        "0.6.3",
        test_deps=("semantic_version",),
        note="request contexts through the test client, current_user via g",
    ),
}


FLASK_ACCESSES = frozenset(
    (
        "tests/test_reqctx.py::test_manual_context_binding",
        "tests/test_appctx.py::test_url_generation_without_context_fails",
        "tests/test_testing.py::test_test_client_context_binding",
    )
)


def flask_suite() -> Suite:
    return Suite("flask", importlib.metadata.version("flask"), expected_accesses=FLASK_ACCESSES)


# -- preparing ----------------------------------------------------------------


def run(cmd: Sequence[str]) -> None:
    """Run a preparation step; its output is shown only when it fails."""
    completed = subprocess.run(list(cmd), text=True, capture_output=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"failed ({completed.returncode}): {' '.join(cmd)}")


def download_and_unpack(suite: Suite, work: Path) -> Path:
    """The suite's sdist, unpacked; returns the folder with its ``tests``."""
    sdists = work / "sdists"
    sdists.mkdir(exist_ok=True)
    run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--no-binary", ":all:", "-d", str(sdists), f"{suite.name}=={suite.version}",
        ]
    )
    wanted = re.compile(
        re.sub(r"[-_.]+", "[-_.]", suite.name) + "-" + re.escape(suite.version) + r"\.tar\.gz$",
        re.IGNORECASE,
    )
    [archive] = [p for p in sdists.iterdir() if wanted.match(p.name)]
    with tarfile.open(archive) as tar:
        top = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if hasattr(tarfile, "data_filter"):
            tar.extractall(work, filter="data")
        else:  # pragma: no cover - Pythons before 3.10.12 / 3.11.4
            tar.extractall(work)
    [root] = top
    source = work / root
    if not (source / "tests").is_dir():
        raise SystemExit(f"{archive.name} ships no tests/ folder")
    shutil.copyfile(CI / "suite_canary.py", source / "tests" / CANARY)
    return source


def export_flask_main(work: Path, git_dir: Path) -> tuple[Path, str]:
    """Flask's main branch exported from a bare clone (never into this repository).

    Returns the folder and ``<commit> (<date>)``; an export already there is reused.
    """
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", f"--git-dir={git_dir}", *args], text=True, capture_output=True, check=True
        ).stdout.strip()

    commit = git("rev-parse", "HEAD")
    when = git("log", "-1", "--format=%cs", "HEAD")
    source = work / f"flask-main-{commit[:12]}"
    if not (source / "pyproject.toml").exists():
        source.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(
            ["git", f"--git-dir={git_dir}", "archive", "HEAD"], stdout=subprocess.PIPE
        )
        try:
            subprocess.run(["tar", "-x", "-C", str(source)], stdin=archive.stdout, check=True)
        finally:
            if archive.stdout is not None:
                archive.stdout.close()
            archive.wait(60)
    return source, f"{commit[:12]} ({when})"


def flask_main_source(work: Path, git_dir: Path) -> tuple[Suite, Path]:
    """Flask's main branch with the canary in its tests."""
    source, version = export_flask_main(work, git_dir)
    shutil.copyfile(CI / "suite_canary.py", source / "tests" / CANARY)
    suite = Suite(
        "flask", f"main@{version.split()[0]}", expected_accesses=FLASK_ACCESSES,
        note="the next release: one AppContext class, bad pops refused",
    )
    return suite, source


def make_venv(
    work: Path, flask: str, suites: Sequence[Suite], name: str = "venv"
) -> Path:
    """One environment for these suites: what each needs, and ctxtrace from this repo.

    ``flask`` is a requirement (``flask==3.1.3``) or a source folder.
    """
    venv = work / name
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    requirements = [
        "pytest<9",  # Flask's conftest imports _pytest.monkeypatch.notset, gone in pytest 9
        "asgiref",
        "python-dotenv",
        flask,
        str(REPO),
    ]
    for suite in suites:
        if suite.name != "flask":
            requirements.append(f"{suite.name}=={suite.version}")
        requirements.extend(suite.test_deps)
    run([str(python), "-m", "pip", "install", "-q", *requirements])
    return python


# -- running ------------------------------------------------------------------


@dataclass
class Run:
    exit_code: int
    seconds: float
    outcomes: dict[str, list[tuple[str, str]]]
    tail: str


@dataclass
class Result:
    suite: Suite
    bare: Run
    instrumented: Run
    plugin: Run
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def parse_junit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Test id -> [(outcome, first line of the message)], one entry per report."""
    outcomes: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for case in ET.parse(path).iter("testcase"):
        classname = case.get("classname", "")
        key = f"{classname}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = child.get("message") or ""
                message = _ADDRESS.sub("0x?", text.splitlines()[0] if text else "")[:300]
        outcomes[key].append((outcome, message))
    return dict(outcomes)


def run_pytest(
    python: Path, source: Path, work: Path, label: str, extra: Sequence[str], env: dict[str, str]
) -> Run:
    junit = work / f"{source.name}-{label}.xml"
    # The same basetemp for both runs, so tmp paths in messages compare equal.
    basetemp = work / f"{source.name}-tmp"
    cmd = [
        str(python), "-m", "pytest", *PYTEST_ARGS, *extra,
        f"--junitxml={junit}", f"--basetemp={basetemp}",
    ]
    started = time.monotonic()
    completed = subprocess.run(
        cmd, cwd=source, env=env, text=True, capture_output=True, timeout=RUN_TIMEOUT_S,
        check=False,
    )
    seconds = time.monotonic() - started
    output = completed.stdout + completed.stderr
    (work / f"{source.name}-{label}.log").write_text(output)
    outcomes = parse_junit(junit) if junit.exists() else {}
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return Run(completed.returncode, seconds, outcomes, tail)


def suite_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # Nothing from the caller's ctxtrace or Python setup reaches the suite.
        if not k.startswith(("CTXTRACE_", "PYTHON", "OTEL_", "FLASK_", "PYTEST_"))
    }
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run_suite(python: Path, suite: Suite, source: Path, work: Path) -> Result:
    events_file = work / f"{source.name}-events.jsonl"
    bare = run_pytest(python, source, work, "bare", (), suite_env())
    instrumented = run_pytest(
        python, source, work, "instrumented", ("-p", "ctxtrace_under_test"),
        suite_env(PYTHONPATH=str(CI), UNDER_TEST_CTXTRACE_EVENTS=str(events_file)),
    )
    # The plugin's entry point is blocked by PYTEST_ARGS; ``-p`` loads it by module.
    plugin = run_pytest(
        python, source, work, "plugin", ("-p", "ctxtrace.pytest_plugin", "--ctxtrace"),
        suite_env(),
    )
    result = Result(suite, bare, instrumented, plugin)
    if events_file.exists():
        for line in events_file.read_text().splitlines():
            record = json.loads(line)
            if record["type"] == "summary":
                result.summary = record
            else:
                result.events.append(record)
    judge(result)
    return result


# -- judging ------------------------------------------------------------------


def judge(result: Result) -> None:
    problems = result.problems
    bare, inst = result.bare, result.instrumented
    for label, one in (("bare", bare), ("instrumented", inst), ("plugin", result.plugin)):
        # 0: all passed, 1: some failed; anything else is a broken run.
        if one.exit_code not in (0, 1):
            problems.append(f"{label} run exited {one.exit_code}: {one.tail}")
        if not one.outcomes:
            problems.append(f"{label} run reported no tests")
    for test_id in sorted(set(bare.outcomes) | set(inst.outcomes)):
        before, after = bare.outcomes.get(test_id), inst.outcomes.get(test_id)
        if before != after:
            problems.append(f"{test_id}: bare {before}, instrumented {after}")
    judge_plugin(result)
    summary = result.summary
    if not summary:
        problems.append("the instrumented run wrote no summary: was ctxtrace loaded?")
        return
    if summary.get("pushes", 0) <= 0:
        problems.append("the instrumented run recorded no pushes: ctxtrace saw nothing")
    if summary.get("internal_errors"):
        problems.append(f"ctxtrace counted internal errors: {summary['internal_errors']}")
    wrong_pop_test = f"{CANARY}::test_ctxtrace_canary_wrong_pop"
    canary_wrong_pop = [
        e for e in result.events
        if e.get("name") == "wrong_pop" and e["test"].endswith(wrong_pop_test)
    ]
    if len(canary_wrong_pop) != 1:
        problems.append(f"expected 1 wrong_pop from the canary, got {len(canary_wrong_pop)}")
    canary_leaks = [
        e for e in result.events
        if e.get("name") == "leaked"
        and ((e.get("context") or {}).get("site") or {}).get("file", "").endswith(CANARY)
    ]
    if len(canary_leaks) != 1:
        problems.append(f"expected 1 leaked from the canary's thread, got {len(canary_leaks)}")
    if result.suite.expected_accesses:
        seen = {e["test"] for e in result.events if e["type"] == "OutOfContextAccess"}
        missing = sorted(result.suite.expected_accesses - seen)
        if missing:
            problems.append(f"no out_of_context_access from {missing}")


def judge_plugin(result: Result) -> None:
    """The plugin run: bare outcomes everywhere but the canary's thread leak, which fails."""
    bare, plugin = result.bare.outcomes, result.plugin.outcomes
    changed = {t for t in set(bare) | set(plugin) if bare.get(t) != plugin.get(t)}
    leak_ids = {t for t in changed if t.endswith(f"::{CANARY_LEAK_TEST}")}
    for test_id in sorted(changed - leak_ids):
        result.problems.append(
            f"{test_id}: bare {bare.get(test_id)}, under --ctxtrace {plugin.get(test_id)}"
        )
    if not leak_ids:
        result.problems.append(f"--ctxtrace did not fail the canary's {CANARY_LEAK_TEST}")


def describe(result: Result) -> list[str]:
    suite, bare, inst, summary = result.suite, result.bare, result.instrumented, result.summary

    def counts(one: Run) -> str:
        tally = collections.Counter(o for reports in one.outcomes.values() for o, _ in reports)
        return ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))

    kinds = collections.Counter(
        e.get("name") or e["type"] for e in result.events
        if e["type"] in ("Anomaly", "OutOfContextAccess")
    )
    outside = sum(1 for e in result.events if e["test"].startswith("<"))
    lines = [
        f"{suite.name} {suite.version}: {len(bare.outcomes)} test ids",
        f"  bare:         {counts(bare)} in {bare.seconds:.1f} s",
        f"  instrumented: {counts(inst)} in {inst.seconds:.1f} s",
        f"  --ctxtrace:   {counts(result.plugin)} in {result.plugin.seconds:.1f} s",
        f"  ctxtrace: {summary.get('pushes', 0)} pushes, {summary.get('pops', 0)} pops, "
        f"{summary.get('active', 0)} active at the end, "
        f"{summary.get('dropped_contexts', 0)} dropped, "
        f"internal errors {summary.get('internal_errors', {}) or 'none'}",
        "  anomalies: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
        + (f" ({outside} outside any test)" if outside else ""),
    ]
    if suite.note:
        lines.append(f"  ({suite.note})")
    lines.extend(f"  PROBLEM {p}" for p in result.problems)
    lines.append(
        "  OK: same outcome for every test id (--ctxtrace failed only the canary's leak)"
        if not result.problems
        else "  FAILED"
    )
    return lines


def doc_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table for docs/compatibility.md."""

    def tally(one: Run) -> str:
        counts = collections.Counter(o for reports in one.outcomes.values() for o, _ in reports)
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))

    lines = [
        f"Last run {datetime.date.today().isoformat()} with Python {sys.version.split()[0]}.",
        "",
        "| suite | version | test ids | outcomes (both runs) | same? | pushes seen | anomalies "
        "| bare / instrumented |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        kinds = collections.Counter(
            e.get("name") or "out_of_context_access"
            for e in r.events
            if e["type"] in ("Anomaly", "OutOfContextAccess")
        )
        lines.append(
            f"| {r.suite.name} | {r.suite.version} | {len(r.bare.outcomes)} | {tally(r.bare)} | "
            f"{'yes' if not r.problems else 'NO'} | {r.summary.get('pushes', 0)} | "
            + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            + f" | {r.bare.seconds:.1f} s / {r.instrumented.seconds:.1f} s |"
        )
    return "\n".join(lines)


def write_doc(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Put `text` between the `begin` and `end` markers of docs/compatibility.md.

    That page has one section per script (this one's, and ci/matrix.py's, which passes
    its own markers), so both write it the same way.
    """
    content = DOC.read_text()
    first, last = content.index(begin) + len(begin), content.index(end)
    DOC.write_text(content[:first] + "\n" + text + "\n" + content[last:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flask", action="store_true", help="run Flask's own suite")
    parser.add_argument(
        "--extension", action="append", default=[], choices=sorted(EXTENSIONS),
        help="also run this extension's suite (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, help="use this folder (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--flask-git", type=Path,
        help="also run Flask main's suite, from this bare clone of pallets/flask",
    )
    parser.add_argument("--write-doc", action="store_true", help=f"record results in {DOC}")
    args = parser.parse_args(argv)
    suites = ([flask_suite()] if args.flask else []) + [EXTENSIONS[e] for e in args.extension]
    if not suites and args.flask_git is None:
        parser.error("nothing to run: give --flask, --extension NAME or --flask-git DIR")
    started = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctxtrace-suites-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        flask_version = importlib.metadata.version("flask")
        print(f"work folder {work}; Flask {flask_version}", flush=True)
        results = []
        if suites:
            sources = [download_and_unpack(s, work) for s in suites]
            python = make_venv(work, f"flask=={flask_version}", suites)
            print(f"environment ready in {time.monotonic() - started:.0f} s", flush=True)
            results += [
                run_suite(python, s, src, work)
                for s, src in zip(suites, sources, strict=True)
            ]
        if args.flask_git is not None:
            main_suite, main_source = flask_main_source(work, args.flask_git)
            main_python = make_venv(work, str(main_source), [main_suite], name="venv-main")
            results.append(run_suite(main_python, main_suite, main_source, work))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for result in results:
        print("\n".join(describe(result)))
    if args.write_doc:
        write_doc(doc_table(results))
    failed = [r.suite.name for r in results if r.problems]
    total = time.monotonic() - started
    if failed:
        print(f"FAILED: {', '.join(failed)} ({total:.0f} s)")
        return 1
    print(f"OK: {len(results)} suites, identical outcomes bare and instrumented ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
