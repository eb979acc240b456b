"""The report as plain text, for the terminal."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from ctxtrace.commands.report.model import (
    FIXES,
    Explain,
    Report,
    WorkerStats,
    anomaly_rank,
    explain,
)
from ctxtrace.core.names import printable


def short_site(site: str, base: Path | None = None) -> str:
    """A site with its path shortened to what a reader needs.

    Relative to ``base`` (default: the current folder) when the file lies under it, else
    relative to the deepest ``sys.path`` entry holding it (``ctxtrace/example/worker.py``
    for an installed package), else unchanged.
    """
    path, sep, line = site.rpartition(":")
    if not sep or not line.isdigit() or not os.path.isabs(path):
        return site
    roots = [str(base or Path.cwd())]
    package_root = _import_root(path)
    if package_root is not None:
        roots.append(package_root)
    roots += sorted((p for p in sys.path if p and os.path.isabs(p)), key=len, reverse=True)
    for root in roots:
        prefix = root.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return f"{path[len(prefix):]}:{line}"
    return site


def _import_root(path: str) -> str | None:
    """The folder above the outermost package holding ``path`` (a file that exists here)."""
    folder = os.path.dirname(path)
    if not os.path.isfile(os.path.join(folder, "__init__.py")):
        return None
    for _ in range(64):  # bounded: a path has far fewer levels
        parent = os.path.dirname(folder)
        if parent == folder or not os.path.isfile(os.path.join(parent, "__init__.py")):
            return parent
        folder = parent
    return None


def format_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1.0:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"



def kinds_line(stats: WorkerStats) -> str:
    if not stats.kinds:
        return "n/a (no metrics and no push/pop log lines)"
    return "  ".join(f"{kind} {stats.kinds[kind].pushes:.0f}" for kind in sorted(stats.kinds))


def lifetimes_line(stats: WorkerStats) -> str:
    parts = []
    for kind in sorted(stats.kinds):
        k = stats.kinds[kind]
        if k.finished:
            parts.append(
                f"{kind}: p50 {format_seconds(k.quantile(0.5))}, "
                f"p99 {format_seconds(k.quantile(0.99))}"
            )
    return "   ".join(parts) if parts else "n/a"



def render_text(report: Report, explainer: Explain | None = None, width: int = 100) -> str:
    """The per-worker report for a terminal."""
    out: list[str] = [report.title, "=" * len(report.title)]
    out += [f"source: {s}" for s in report.sources]
    active = [w for w in report.workers.values() if not w.idle]
    idle = [w.worker for w in report.workers.values() if w.idle]
    wrap = textwrap.TextWrapper(width=width, subsequent_indent=" " * 10)
    for stats in sorted(active, key=lambda w: w.worker):
        out.append("")
        origin = "metrics and log" if stats.has_metrics else "log only"
        out.append(f"{stats.worker}  ({origin})")
        out.append(f"  contexts   {kinds_line(stats)}")
        out.append(f"  lifetime   {lifetimes_line(stats)}")
        anomalies = stats.anomalies
        if not anomalies:
            out.append("  anomalies  none")
            continue
        out.append("  anomalies")
        for anomaly in sorted(anomalies, key=anomaly_rank):
            out.append(f"    {anomaly} x{anomalies[anomaly]}")
            culprits = report.culprits_of(stats.worker, anomaly)
            if not culprits:
                out.append("      site: not in the logs given (add --log with the JSON lines)")
                out.append(f"      fix:  {FIXES.get(anomaly, '')}")
            for culprit, count in culprits:
                where = short_site(culprit.site)
                func = f" in {culprit.function}" if culprit.function else ""
                out.append(f"      {where}{func}  x{count}")
                if culprit.top_site and culprit.top_site != culprit.site:
                    out.append(f"        context on top pushed at {short_site(culprit.top_site)}")
                info = explain(culprit, explainer)
                if info.cause:
                    label = f"[{info.label}] " if info.label else ""
                    wrap.initial_indent = "        cause: "
                    out.extend(wrap.wrap(label + info.cause))
                wrap.initial_indent = "        fix:   "
                out.extend(wrap.wrap(info.fix))
    if idle:
        out.append("")
        out.append("no contexts or anomalies: " + ", ".join(sorted(idle)))
    if not report.workers:
        out.append("")
        out.append("nothing from ctxtrace in these sources")
    for note in report.notes:
        out.append("")
        out.append(f"note: {note}")
    # Sites, functions and workers come from log lines anyone may have written:
    # nothing in them may act on the terminal (escapes, bidi overrides). Each
    # entry of ``out`` is one line (wrapped text was added line by line), so a
    # newline inside one came from the data and is escaped too.
    return "\n".join(printable(line) for line in out) + "\n"
