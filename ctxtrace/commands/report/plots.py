"""The report's three panels as one PNG, drawn with matplotlib when it is installed."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any, Final, cast

from ctxtrace._events import ANOMALY_KINDS
from ctxtrace.commands.report.model import Report, anomaly_rank
from ctxtrace.commands.report.text import short_site

#: How to get the plots, for the HTML and the terminal.
INSTALL_HINT: Final = "pip install 'ctxtrace[report]'"
#: One colour per anomaly, the same in every panel.
PALETTE: Final = {kind.name: kind.colour for kind in ANOMALY_KINDS}


def figure_png(report: Report, dpi: int = 110) -> bytes | None:
    """The three panels as one PNG, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (the optional extra)
    except ImportError:
        return None
    # No pyplot: a bare Figure keeps no global state and needs no display.
    fig = Figure(figsize=(13, 9), layout="constrained")
    fig.suptitle(report.title, fontsize=13, fontweight="bold")
    # Subfigures lay out on their own: the culprit panel's long labels leave the top alone.
    top, bottom = cast(Any, fig.subfigures(2, 1, height_ratios=(1.1, 1)))
    left, right = top.subplots(1, 2)
    _plot_lifetimes(left, report)
    _plot_timeline(right, report)
    _plot_culprits(bottom.subplots(), report)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _short_worker(worker: str) -> str:
    parts = worker.split(":")
    return f"{parts[1]}:{parts[2]}" if len(parts) == 3 else worker


def _milliseconds(value: float, _position: object = None) -> str:
    return f"{value:g} ms"


def _count_scale(axis: Any, highest: float) -> None:
    """Readable ticks (0 1 2 5 10 20 50 ...) on a symlog count axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: PLC0415 (the extra)

    ticks = [0.0]
    for decade in range(8):
        ticks += [m * 10.0**decade for m in (1, 2, 5) if m * 10.0**decade <= highest * 1.5]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _p: f"{value:g}"))
    axis.set_minor_locator(FixedLocator([]))


def _plot_lifetimes(ax: Any, report: Report) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: PLC0415 (the extra)

    ax.set_title("Context lifetime per worker")
    rows: list[tuple[str, float, float]] = []
    for stats in sorted(report.workers.values(), key=lambda w: w.worker):
        for kind in sorted(stats.kinds):
            k = stats.kinds[kind]
            p50, p99 = k.quantile(0.5), k.quantile(0.99)
            if p50 is not None and p99 is not None:
                rows.append((f"{_short_worker(stats.worker)}\n{kind}", p50 * 1e3, p99 * 1e3))
    if not rows:
        ax.text(0.5, 0.5, "no lifetimes in these sources\n(metrics, or lifecycle log lines)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    positions = [float(i) for i in range(len(rows))]
    ax.bar([x - 0.2 for x in positions], [r[1] for r in rows], 0.4, label="p50",
           color="#4c78a8")
    ax.bar([x + 0.2 for x in positions], [r[2] for r in rows], 0.4, label="p99",
           color="#9ecae9")
    ax.set_xticks(positions, [r[0] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(_milliseconds))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _p: ""))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _plot_timeline(ax: Any, report: Report) -> None:
    ax.set_title("Anomalies over time (all workers)")
    if not report.timeline:
        ax.text(0.5, 0.5, "no timeline in these sources\n(a log, or a Prometheus server)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    start = min(at for at, *_ in report.timeline)
    by_anomaly: dict[str, list[tuple[float, int]]] = {}
    for at, _worker, anomaly, count in sorted(report.timeline):
        by_anomaly.setdefault(anomaly, []).append((at - start, count))
    for anomaly in sorted(by_anomaly, key=anomaly_rank):
        xs, ys, total = [0.0], [0], 0
        for offset, count in by_anomaly[anomaly]:
            total += count
            xs.append(offset)
            ys.append(total)
        ax.step(xs, ys, where="post", label=anomaly, linewidth=2,
                color=PALETTE.get(anomaly, "#888888"))
    ax.set_xlabel(f"seconds since {datetime.fromtimestamp(start, timezone.utc):%H:%M:%S} UTC")
    ax.set_ylabel("anomalies so far")
    ax.set_yscale("symlog", linthresh=10)
    _count_scale(ax.yaxis, max(sum(c for _, c in points) for points in by_anomaly.values()))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)


def _plot_culprits(ax: Any, report: Report, top: int = 10) -> None:
    ax.set_title(f"Top culprit sites (from the logs; first {top})")
    culprits = report.ordered_culprits()[:top]
    if not culprits:
        ax.text(0.5, 0.5, "no sites: metrics never carry them; add --log with the JSON lines",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    shown = list(reversed(culprits))
    labels = [
        f"{short_site(c.site)}" + (f" ({c.function})" if c.function else "") for c in shown
    ]
    bars = ax.barh(
        range(len(shown)), [c.count for c in shown],
        color=[PALETTE.get(c.anomaly, "#888888") for c in shown],
    )
    for bar, culprit in zip(bars, shown, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f"  {culprit.anomaly} x{culprit.count}", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), labels, fontsize=9, family="monospace")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, max(c.count for c in shown) * 4)
    _count_scale(ax.xaxis, max(c.count for c in shown) * 4)
    ax.set_xlabel("anomalies")
    ax.grid(axis="x", alpha=0.3)
