"""``ctxtrace demo``: what ctxtrace finds in a real Flask service, in one command.

Runs the example shop that ships in ``ctxtrace.example`` under gunicorn (2 gthread workers;
a threaded werkzeug server when gunicorn is missing) with ctxtrace on in every worker and its
embedded default exporters, drives a bounded load through its healthy endpoints and through
one endpoint per seeded fault (``ctxtrace.example.SCENARIOS``), runs the shop's faulty CLI
command, scrapes every worker's ``/metrics``, stops everything it started, and prints a
per-worker report: contexts by kind, lifetimes, each anomaly with its count, the line of code
behind it and the fix. Into the output folder go the JSON log, the metrics snapshot and the
report as HTML (with plots when the ``report`` extra is installed).

Ctrl-C stops the load early and still reports what was seen; a second Ctrl-C skips the
report. Every process started is stopped by its pid either way.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from ctxtrace.commands.report import model as report_model
from ctxtrace.commands.report import page as report_page
from ctxtrace.commands.report import plots as report_plots
from ctxtrace.commands.report import sources as report_sources
from ctxtrace.commands.report import text as report_text
from ctxtrace.telemetry.prometheus import target_file_name

COMMAND: Final = "demo"
#: Healthy endpoints of the shop; /items/99 is a healthy 404.
HEALTHY: Final = (
    "/", "/items", "/items/1", "/items/2", "/items/3", "/items/4", "/items/99",
    "/stream", "/stream?low_stock=1", "/ok/thread-config",
)
#: Rounds of (healthy batch, every HTTP fault once); a last healthy batch follows.
ROUNDS: Final = 3
HEALTHY_PER_BATCH: Final = 60
CLIENT_THREADS: Final = 4
#: How often the follow-up of a fault may be sent before the demo gives up on reaching the
#: same worker thread (it nearly always does on the first or second try).
FOLLOW_UP_TRIES: Final = 20
#: Bounds on waiting: for late anomalies (leaks found by the watchdog), for the CLI command.
SETTLE_S: Final = 8.0
#: Anomaly counts unchanged for this long are final (longer than the watchdog's interval).
STILL_S: Final = 1.2
CLI_TIMEOUT_S: Final = 60.0
LOG_NAME: Final = "ctxtrace.jsonl"
_CTXTRACE: Final = "import sys; from ctxtrace.cli import main; sys.exit(main())"


# -- which seeded fault a log line points at ---------------------------------------------


def culprit_functions() -> dict[str, tuple[str, str]]:
    """For each scenario id, the file (base name) and function where the agent sees it."""
    # Imported here: the example app is only needed when the demo runs.
    from ctxtrace.example import cli, extension, faults, middleware, worker  # noqa: PLC0415

    def where(function: Callable[..., Any]) -> tuple[str, str]:
        code = function.__code__
        return os.path.basename(code.co_filename), code.co_name

    callback = cli.report_config.callback
    assert callback is not None
    return {
        "thread-config": where(worker.restock_check),
        "push-no-pop": where(worker.export_report),
        # Importing this module is the fault itself, so it is named, not imported.
        "import-time": ("lazy_settings.py", "<module>"),
        "extension-before-init": where(extension.Audit.record),
        "wrong-order": where(faults.wrong_order),
        "stale-g": where(middleware.RequestTimer.__call__),
        "cli-report-config": where(callback),
    }


def scenario_of(culprit: report_model.Culprit, table: dict[str, tuple[str, str]]) -> str | None:
    """The id of the scenario whose code a culprit's site points at, if any."""
    path, _sep, _line = culprit.site.rpartition(":")
    name = (culprit.function or "").rsplit(".", 1)[-1]
    for scenario_id, (file, function) in table.items():
        if os.path.basename(path) == file and name == function:
            return scenario_id
    return None


def explainer(table: dict[str, tuple[str, str]]) -> report_model.Explain:
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415

    by_id = {s.id: s for s in SCENARIOS}

    def explain(culprit: report_model.Culprit) -> report_model.Explanation | None:
        scenario_id = scenario_of(culprit, table)
        if scenario_id is None:
            return None
        scenario = by_id[scenario_id]
        return report_model.Explanation(f"scenario {scenario.id}", scenario.cause, scenario.fix)

    return explain


# -- progress -----------------------------------------------------------------------------


class Progress:
    """A one-line bar on a terminal; a line per quarter elsewhere (CI logs)."""

    def __init__(self, total: int, stream: IO[str], width: int = 30) -> None:
        self.total = max(1, total)
        self.done = 0
        self._stream = stream
        self._width = width
        self._tty = stream.isatty()
        self._quarter = -1

    def advance(self, label: str, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        share = self.done / self.total
        if self._tty:
            filled = int(share * self._width)
            bar = "#" * filled + "-" * (self._width - filled)
            self._stream.write(f"\r  [{bar}] {share:4.0%} {label[:40]:<40}")
            self._stream.flush()
        elif int(share * 4) > self._quarter:
            self._quarter = int(share * 4)
            self._stream.write(f"  {share:4.0%} {label}\n")
            self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


# -- load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """What the load saw: requests sent, failures, and what each fault's trigger answered."""

    requests: int = 0
    failures: list[str] = field(default_factory=list)
    follow_ups: dict[str, dict[str, Any]] = field(default_factory=dict)


def _get(url: str) -> tuple[int, bytes]:
    """Status and body; status 0 when the server did not answer at all."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()
    except OSError as exc:
        return 0, str(exc).encode()


def _healthy_batch(base: str, count: int, load: Load, progress: Progress) -> None:
    paths = [HEALTHY[i % len(HEALTHY)] for i in range(count)]
    with ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="demo-load") as pool:
        answers = pool.map(lambda path: _get(base + path), paths)
        for path, (status, _body) in zip(paths, answers, strict=True):
            load.requests += 1
            if status >= 500 or status == 0:
                load.failures.append(f"{path}: HTTP {status or 'no answer'}")
            progress.advance(f"GET {path}")


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _trigger(base: str, path: str, follow_up: str | None, load: Load) -> dict[str, Any]:
    """GET the fault's path; then its follow-up on one kept-alive connection until the
    follow-up lands on the worker thread that served the fault (bounded)."""
    try:
        return _trigger_on(base, path, follow_up, load)
    except (OSError, http.client.HTTPException) as exc:
        load.failures.append(f"{path}: {exc!r}")
        return {}


def _trigger_on(base: str, path: str, follow_up: str | None, load: Load) -> dict[str, Any]:
    host, _sep, port = base.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        first = _json(response.read())
        load.requests += 1
        if response.status >= 500:
            load.failures.append(f"{path}: HTTP {response.status}")
        if follow_up is None:
            return {}
        seen: dict[str, Any] = {}
        for _ in range(FOLLOW_UP_TRIES):
            connection.request("GET", follow_up)
            answer = connection.getresponse()
            seen = _json(answer.read())
            load.requests += 1
            # A keep-alive connection stays with one worker process; its thread may vary.
            if seen.get("thread") == first.get("thread"):
                break
        return {"path": follow_up, "trigger_thread": first.get("thread"), **seen}
    finally:
        connection.close()


def drive(base: str, progress: Progress, load: Load) -> None:
    """The whole bounded load: rounds of healthy traffic and every HTTP fault, noted in
    ``load`` as it goes (an interrupted load still says what it sent)."""
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415

    for _round in range(ROUNDS):
        _healthy_batch(base, HEALTHY_PER_BATCH, load, progress)
        for scenario in SCENARIOS:
            if scenario.kind != "http":
                continue
            seen = _trigger(base, scenario.trigger, scenario.follow_up, load)
            if seen and scenario.id not in load.follow_ups:
                load.follow_ups[scenario.id] = seen
            progress.advance(f"GET {scenario.trigger}")
    _healthy_batch(base, HEALTHY_PER_BATCH, load, progress)


def load_steps() -> int:
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415

    http_faults = sum(1 for s in SCENARIOS if s.kind == "http")
    return (ROUNDS + 1) * HEALTHY_PER_BATCH + ROUNDS * http_faults


# -- the CLI fault, metrics, logs ---------------------------------------------------------


def run_cli_faults(out: Path, env: dict[str, str]) -> list[tuple[str, int | None]]:
    """Run each CLI scenario as ``ctxtrace run -- python -m ctxtrace.example COMMAND``."""
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415

    results: list[tuple[str, int | None]] = []
    for scenario in SCENARIOS:
        if scenario.kind != "cli":
            continue
        command = [
            sys.executable, "-c", _CTXTRACE, "run",
            # A command ends before any scrape: its anomalies come from its log lines
            # (what the rate limit held back is written out as the command exits).
            "--set=metrics=none",
            "--", sys.executable, "-m", "ctxtrace.example", scenario.trigger,
        ]
        with open(out / f"{scenario.trigger}.log", "wb") as log:
            process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            status: int | None = None
            try:
                status = process.wait(CLI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass  # reported as "exited None"
            finally:
                if process.poll() is None:  # timed out, or Ctrl-C: stop it by its pid
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    process.wait(5)
        results.append((scenario.trigger, status))
    return results


def _scrape(target: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
            return str(response.read().decode("utf-8"))
    except OSError:
        return None


def _totals(targets: dict[str, str]) -> Counter[str]:
    report = report_model.Report()
    for target in targets.values():
        text = _scrape(target)
        if text is not None:
            report_sources.add_samples(report, report_sources.samples_from_text(text))
    return report.anomaly_totals()


def settle(targets: dict[str, str], expected: set[str]) -> None:
    """Wait (bounded) until the workers' metrics count every expected anomaly and hold still.

    Some anomalies are found a little after the request: a leak in a finished thread is
    reported when the watchdog next looks (every ``CTXTRACE_SWEEP_INTERVAL``, 1 s by default),
    so the counts must stay the same for longer than that.
    """
    deadline = time.monotonic() + SETTLE_S
    previous: Counter[str] | None = None
    while time.monotonic() < deadline:
        totals = _totals(targets)
        if expected <= set(totals) and totals == previous:
            return
        previous = totals
        time.sleep(STILL_S)


def save_metrics(targets: dict[str, str], folder: Path) -> list[Path]:
    """Each endpoint's ``/metrics`` text as ``<folder>/<worker>.prom``."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for worker, target in sorted(targets.items()):
        text = _scrape(target)
        if text is None:
            continue
        path = folder / target_file_name(worker).replace(".json", ".prom")
        path.write_text(f"# ctxtrace demo: scraped from http://{target}/metrics\n{text}")
        saved.append(path)
    return saved


def collect_log(sources: Sequence[Path], destination: Path) -> int:
    """Copy the JSON lines of the captured outputs into one JSON-lines file."""
    written = 0
    with open(destination, "w", encoding="utf-8") as out:
        for source in sources:
            if not source.exists():
                continue
            with open(source, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    entries, _rest = report_sources.json_objects(line)
                    for entry in entries:
                        if str(entry.get("event", "")).startswith("ctxtrace."):
                            out.write(json.dumps(entry) + "\n")
                            written += 1
    return written


# -- the summary of seeded faults ----------------------------------------------------------


def scenario_findings(
    report: report_model.Report, table: dict[str, tuple[str, str]]
) -> dict[str, dict[str, list[report_model.Culprit]]]:
    """For each scenario, the culprits found for each anomaly it expects."""
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415

    found: dict[str, dict[str, list[report_model.Culprit]]] = {
        s.id: {a: [] for a in s.anomalies} for s in SCENARIOS
    }
    for culprit in report.culprits.values():
        scenario_id = scenario_of(culprit, table)
        if scenario_id is not None and culprit.anomaly in found[scenario_id]:
            found[scenario_id][culprit.anomaly].append(culprit)
    return found


def render_findings(
    findings: dict[str, dict[str, list[report_model.Culprit]]],
    load: Load,
    interrupted: bool = False,
) -> tuple[str, int]:
    """The checklist of seeded faults; returns it and how many were not reported."""
    lines = ["", "Seeded faults (ctxtrace/example/scenarios.py)"]
    missing = 0
    for scenario_id, by_anomaly in findings.items():
        for anomaly, culprits in by_anomaly.items():
            if culprits:
                sites = ", ".join(sorted({report_text.short_site(c.site) for c in culprits}))
                count = sum(c.count for c in culprits)
                lines.append(f"  [x] {scenario_id:<22} {anomaly:<22} x{count:<3} at {sites}")
            else:
                missing += 1
                lines.append(f"  [ ] {scenario_id:<22} {anomaly:<22} not reported")
        seen = load.follow_ups.get(scenario_id)
        if seen:
            same = seen.get("thread") == seen.get("trigger_thread")
            where = "on the same worker thread" if same else "on another thread"
            lines.append(
                f"      follow-up {seen.get('path')} {where} saw "
                f"g.leaked_marker={seen.get('leaked_marker')!r}"
            )
    if missing and interrupted:
        lines.append("  Interrupted: the faults not reported may not have been triggered.")
    elif missing:
        lines.append(f"  {missing} expected anomalies were not reported.")
    else:
        lines.append("  Every seeded fault was reported, with the line of code behind it.")
    return "\n".join(lines) + "\n", missing


# -- the command ------------------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the console script's subcommands; ``handler`` runs it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="run the example shop with its seeded context faults and report what ctxtrace saw",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output folder (default ./ctxtrace-demo-<timestamp>/)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, choices=range(1, 9), metavar="N",
        help="gunicorn workers (default 2)",
    )
    parser.add_argument(
        "--server", choices=("auto", "gunicorn", "werkzeug"), default="auto",
        help="gunicorn when installed (auto, the default), or werkzeug's threaded server",
    )
    parser.set_defaults(handler=run)
    return parser


#: What a run writes into its folder; cleared first, so a reused folder holds one run.
OUTPUTS: Final = (
    "server.log", LOG_NAME, "report.html", "report.png", "report.txt", "report-config.log",
)


def _prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for old in (out / "metrics").glob("*.prom"):
        old.unlink()


def _stop(server: Any) -> None:
    """Stop the server even through further Ctrl-Cs (each retry finishes the job)."""
    for _attempt in range(3):
        try:
            server.stop()
            return
        except KeyboardInterrupt:
            print("  still stopping the server ...", file=sys.stderr)
    server.stop()


def run(args: argparse.Namespace) -> int:
    from ctxtrace.example import SCENARIOS  # noqa: PLC0415
    from ctxtrace.example.serve import server_environment, start_server  # noqa: PLC0415

    started = time.monotonic()
    out: Path = args.out or Path(f"ctxtrace-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    _prepare(out)
    err = sys.stderr
    print(f"ctxtrace demo: output in {out}/", file=err)
    server = None
    load = Load()
    interrupted = False
    cli_results: list[tuple[str, int | None]] = []
    saved: list[Path] = []
    try:
        print("  starting the example shop with ctxtrace on ...", file=err)
        # ctxtrace's own defaults, rate-limited logs included: each worker writes out
        # what the rate limit held back when it exits, so the log's counts are whole.
        server = start_server(out, args.workers, server=args.server)
        shape = (
            f"gunicorn, {len(server.pids)} gthread workers"
            if server.kind == "gunicorn" else "werkzeug, a pool of threads"
        )
        print(f"  serving at {server.url} ({shape}); sending requests", file=err)
        progress = Progress(load_steps(), err)
        try:
            drive(server.url, progress, load)
        finally:
            progress.close()
        print("  running the CLI fault: python -m ctxtrace.example report-config", file=err)
        env, _settings = server_environment(os.environ, out / "targets", {})
        cli_results = run_cli_faults(out, env)
        expected: set[str] = {a for s in SCENARIOS if s.kind == "http" for a in s.anomalies}
        settle(server.targets(), expected)
        saved = save_metrics(server.targets(), out / "metrics")
    except KeyboardInterrupt:
        interrupted = True
        print("\n  interrupted: stopping, then reporting what was seen", file=err)
    finally:
        if server is not None:
            print("  stopping the server", file=err)
            _stop(server)
    try:
        return _finish(out, server, load, cli_results, saved, interrupted, started)
    except KeyboardInterrupt:
        print("\n  interrupted again: no report", file=err)
        return 130


def _finish(
    out: Path,
    server: Any,
    load: Load,
    cli_results: list[tuple[str, int | None]],
    saved: list[Path],
    interrupted: bool,
    started: float,
) -> int:
    logs = [out / "server.log", *(out / f"{trigger}.log" for trigger, _ in cli_results)]
    log_path = out / LOG_NAME
    lines = collect_log(logs, log_path)
    shape = "gunicorn" if server is not None and server.kind == "gunicorn" else "werkzeug"
    title = f"ctxtrace demo: the example shop under {shape}"
    report = report_model.Report(title=title)
    for path in saved:
        report_sources.add_metrics_text(report, path.read_text(encoding="utf-8"), str(path))
    report_sources.add_log_file(report, log_path)
    table = culprit_functions()
    explain = explainer(table)
    text = report_text.render_text(report, explain)
    findings, missing = render_findings(scenario_findings(report, table), load, interrupted)
    text += findings
    elapsed = time.monotonic() - started
    summary = [
        "",
        f"{load.requests} requests"
        + "".join(f", `{t}` exited {s}" for t, s in cli_results)
        + f"; {elapsed:.1f} s in all" + (" (interrupted)" if interrupted else ""),
    ]
    if load.failures:
        summary.append(f"unexpected answers: {', '.join(load.failures[:5])}")
    png = report_page.write_outputs(report, out / "report.html", explain, out / "report.png")
    summary.append(f"output in {out}/:")
    summary.append(f"  {LOG_NAME:<16} {lines} JSON log lines (every worker and the command)")
    summary.append(f"  {'metrics/':<16} /metrics of each process ({len(saved)} files)")
    summary.append(f"  {'report.html':<16} this report" + (" with plots" if png else ""))
    if png is not None:
        summary.append(f"  {'report.png':<16} the plots")
    else:
        summary.append(f"  (no plots: {report_plots.INSTALL_HINT})")
    summary.append(f"  {'server.log':<16} everything the server printed")
    summary.append(
        f"same report again: ctxtrace report --log {log_path} --metrics {out / 'metrics'}"
    )
    text += "\n".join(summary) + "\n"
    (out / "report.txt").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    if interrupted:
        return 0
    return 1 if missing or load.failures else 0
