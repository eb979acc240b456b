"""``ctxtrace report``: the key panels from a running system or its logs, as HTML.

Sources, any mix of them, each repeatable:

* ``--prometheus URL``: a Prometheus server (its HTTP API: the latest value of every
  ``ctxtrace_*`` series, and anomaly counters over ``--since`` for the timeline), or one
  worker's ``/metrics`` endpoint (a URL ending in ``/metrics``);
* ``--metrics FILE``: a saved ``/metrics`` text snapshot (a file, or a folder of ``*.prom``);
* ``--log FILE``: the workers' JSON log lines (``ctxtrace.*`` events; other lines skipped).

Metrics give exact counts per worker (contexts by kind, anomalies) and lifetimes (from the
``ctxtrace_context_duration_seconds`` buckets); only the logs name the line of code behind
each anomaly (``site``, ``top_site``), since metric labels never carry sites. The panels:
context lifetimes per worker, anomalies over time, top culprit sites. They are drawn with
matplotlib, the ``report`` extra (``pip install 'ctxtrace[report]'``); without it the HTML has
the same tables and says how to get the plots. ``ctxtrace demo`` renders its report here too.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final

from ctxtrace.commands.report.model import Report
from ctxtrace.commands.report.page import write_outputs
from ctxtrace.commands.report.plots import INSTALL_HINT
from ctxtrace.commands.report.sources import add_log_file, add_metrics_text, add_prometheus
from ctxtrace.commands.report.text import render_text

COMMAND: Final = "report"


def _since(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    try:
        unit = units.get(text[-1:], 0)
        seconds = float(text[:-1]) * unit if unit else float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (e.g. 15m, 2h)") from exc
    if not 0 < seconds <= 90 * 86400:
        raise argparse.ArgumentTypeError(f"out of range: {value!r}")
    return seconds


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to the console script's subcommands; ``handler`` runs it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="draw lifetimes, anomalies over time and culprit sites to HTML",
        description=(__doc__ or "").split("\n\n", 1)[0],
        usage="ctxtrace report [--prometheus URL] [--metrics FILE] [--log FILE] [--out HTML]",
    )
    parser.add_argument(
        "--prometheus", action="extend", nargs="+", default=[], metavar="URL",
        help="a Prometheus server, or a worker's /metrics endpoint (repeatable)",
    )
    parser.add_argument(
        "--metrics", action="extend", nargs="+", default=[], metavar="FILE", type=Path,
        help="a saved /metrics text snapshot, or a folder of *.prom files (repeatable)",
    )
    parser.add_argument(
        "--log", action="extend", nargs="+", default=[], metavar="FILE", type=Path,
        help="JSON log lines of the workers (repeatable)",
    )
    parser.add_argument(
        "--since", type=_since, default=3600.0, metavar="DURATION",
        help="how far back the timeline reaches on a Prometheus server (default 1h)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), metavar="HTML",
        help="where to write the HTML (default report.html)",
    )
    parser.add_argument("--png", type=Path, metavar="FILE", help="also write the panels as PNG")
    parser.add_argument("--title", default="ctxtrace report", help="the report's title")
    parser.add_argument(
        "--runbook-url", metavar="URL",
        help="where your copy of docs/runbook.md is published: anomalies link to URL#anomaly",
    )
    parser.set_defaults(handler=run)
    return parser


def _metric_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.prom"))
    return [path]


def build(args: argparse.Namespace) -> Report:
    """The report from the parsed arguments; raises ``OSError``/``ValueError`` on a bad source."""
    report = Report(title=args.title, runbook_url=getattr(args, "runbook_url", None))
    for url in args.prometheus:
        try:
            add_prometheus(report, url, args.since)
        except (OSError, urllib.error.URLError) as exc:
            raise OSError(f"cannot read {url}: {exc}") from exc
    for path in args.metrics:
        for file in _metric_files(path):
            add_metrics_text(report, file.read_text(encoding="utf-8"), str(file))
    for path in args.log:
        add_log_file(report, path)
    if report.skipped_lines:
        report.notes.append(f"{report.skipped_lines} log lines were not ctxtrace JSON; skipped.")
    return report


def run(args: argparse.Namespace) -> int:
    if not (args.prometheus or args.metrics or args.log):
        print("ctxtrace report: give at least one of --prometheus, --metrics, --log",
              file=sys.stderr)
        return 2
    try:
        report = build(args)
    except (OSError, ValueError) as exc:
        print(f"ctxtrace report: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_text(report))
    png = write_outputs(report, args.out, png_path=args.png)
    print(f"\nwrote {args.out}" + (f" and {args.png}" if args.png and png else ""))
    if png is None:
        print(f"(no plots: {INSTALL_HINT})")
    return 0
