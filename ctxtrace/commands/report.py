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
import base64
import html
import io
import json
import math
import os
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, cast

from ctxtrace._events import ANOMALY_KINDS

COMMAND: Final = "report"
#: How to get the plots, for the HTML and the terminal.
INSTALL_HINT: Final = "pip install 'ctxtrace[report]'"
#: Every anomaly, in the order reports list them.
ANOMALY_ORDER: Final = tuple(kind.name for kind in ANOMALY_KINDS)
RUNBOOK: Final = "docs/runbook.md"

#: The general fix for each anomaly (the runbook's "Fix" lines); a caller that knows the
#: application better (``ctxtrace demo`` knows its seeded faults) can say more.
FIXES: Final[dict[str, str]] = {kind.name: kind.fix for kind in ANOMALY_KINDS}

_EVENT_PREFIX: Final = "ctxtrace."


# -- the model ------------------------------------------------------------------------


@dataclass
class KindStats:
    """One worker's contexts of one kind (``app`` or ``request``), summed over apps."""

    pushes: float = 0.0
    active: float = 0.0
    #: Cumulative histogram: upper bound (seconds, ``inf`` last) -> count.
    buckets: dict[float, float] = field(default_factory=dict)
    #: Exact lifetimes, from ``ctxtrace.pop`` log lines (``CTXTRACE_LOG_LIFECYCLE=true``).
    durations: list[float] = field(default_factory=list)

    @property
    def finished(self) -> float:
        if self.buckets:
            return self.buckets.get(math.inf, max(self.buckets.values()))
        return float(len(self.durations))

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the lifetimes in seconds, or None with no data."""
        if self.buckets:
            return bucket_quantile(q, self.buckets)
        if self.durations:
            ordered = sorted(self.durations)
            return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
        return None


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over one cumulative histogram.

    Linear interpolation inside the bucket that holds the rank; a rank in the ``+Inf``
    bucket gives the highest finite bound, as Prometheus does.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                finite = [b for b in bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None


@dataclass
class WorkerStats:
    """What one process (a worker, a command) did."""

    worker: str
    kinds: dict[str, KindStats] = field(default_factory=dict)
    #: Anomaly counts from metrics (exact at the scrape) and from log lines (every line
    #: counts once plus its ``suppressed_since_last``).
    metric_anomalies: Counter[str] = field(default_factory=Counter)
    log_anomalies: Counter[str] = field(default_factory=Counter)
    apps: set[str] = field(default_factory=set)
    has_metrics: bool = False

    def kind(self, name: str) -> KindStats:
        stats = self.kinds.get(name)
        if stats is None:
            stats = self.kinds[name] = KindStats()
        return stats

    @property
    def anomalies(self) -> Counter[str]:
        """Per anomaly, the larger of the two counts: each source can only undercount."""
        merged: Counter[str] = Counter()
        for name in set(self.metric_anomalies) | set(self.log_anomalies):
            merged[name] = int(max(self.metric_anomalies[name], self.log_anomalies[name]))
        return +merged

    @property
    def pid(self) -> int | None:
        parts = self.worker.split(":")
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None

    @property
    def idle(self) -> bool:
        return not any(k.pushes or k.finished for k in self.kinds.values()) and not self.anomalies


@dataclass
class Culprit:
    """One line of code behind one anomaly, as the log lines name it."""

    anomaly: str
    site: str
    function: str | None = None
    count: int = 0
    workers: Counter[str] = field(default_factory=Counter)
    #: For wrong_pop: where the context on top was pushed (usually the real culprit).
    top_site: str | None = None
    #: Other fields worth showing (proxy, phase, unit, started_by, reason...), value -> count.
    details: dict[str, Counter[str]] = field(default_factory=dict)
    first_seen: float | None = None


@dataclass(frozen=True)
class Explanation:
    """What a caller knows about a culprit: a label, the cause and the fix."""

    label: str
    cause: str
    fix: str


Explain = Callable[[Culprit], Explanation | None]


@dataclass
class Report:
    """Everything the renderers draw, gathered from every source."""

    workers: dict[str, WorkerStats] = field(default_factory=dict)
    culprits: dict[tuple[str, str], Culprit] = field(default_factory=dict)
    #: ``(unix time, worker, anomaly, count)``.
    timeline: list[tuple[float, str, str, int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_lines: int = 0
    title: str = "ctxtrace report"

    def worker(self, name: str) -> WorkerStats:
        stats = self.workers.get(name)
        if stats is None:
            stats = self.workers[name] = WorkerStats(name)
        return stats

    def ordered_culprits(self) -> list[Culprit]:
        return sorted(self.culprits.values(), key=lambda c: (-c.count, _order(c.anomaly), c.site))

    def culprits_of(self, worker: str, anomaly: str) -> list[tuple[Culprit, int]]:
        found = [
            (c, c.workers[worker])
            for c in self.culprits.values()
            if c.anomaly == anomaly and c.workers[worker]
        ]
        return sorted(found, key=lambda pair: (-pair[1], pair[0].site))

    def anomaly_totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for stats in self.workers.values():
            total.update(stats.anomalies)
        return total


def _order(anomaly: str) -> int:
    return ANOMALY_ORDER.index(anomaly) if anomaly in ANOMALY_ORDER else len(ANOMALY_ORDER)


# -- metrics ----------------------------------------------------------------------------

Sample = tuple[str, dict[str, str], float]


def samples_from_text(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def add_samples(report: Report, samples: Iterable[Sample]) -> int:
    """Fold ctxtrace's metrics into the report; returns how many samples were ctxtrace's."""
    used = 0
    for name, labels, value in samples:
        worker = labels.get("worker")
        if not name.startswith("ctxtrace_") or worker is None or math.isnan(value):
            continue
        used += 1
        stats = report.worker(worker)
        stats.has_metrics = True
        if "app" in labels:
            stats.apps.add(labels["app"])
        kind = labels.get("kind", "")
        if name == "ctxtrace_contexts_total":
            stats.kind(kind).pushes += value
        elif name == "ctxtrace_contexts_active":
            stats.kind(kind).active += value
        elif name == "ctxtrace_context_duration_seconds_bucket":
            bound = float(labels.get("le", "+Inf"))
            buckets = stats.kind(kind).buckets
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif name == "ctxtrace_anomalies_total" and value:
            stats.metric_anomalies[labels.get("anomaly", "?")] += int(value)
        elif name == "ctxtrace_out_of_context_access_total" and value:
            stats.metric_anomalies["out_of_context_access"] += int(value)
    return used


def add_metrics_text(report: Report, text: str, source: str) -> None:
    used = add_samples(report, samples_from_text(text))
    report.sources.append(f"metrics {source} ({used} ctxtrace samples)")


def _read_url(url: str, timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "text/plain, application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _api(base: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    answer = json.loads(_read_url(url))
    if answer.get("status") != "success":
        raise ValueError(f"Prometheus answered {answer.get('status')}: {answer.get('error')}")
    return answer["data"]


def add_prometheus(report: Report, url: str, since_s: float = 3600.0) -> None:
    """A ``/metrics`` endpoint (URL ending in ``/metrics``) or a Prometheus server's API."""
    if urllib.parse.urlsplit(url).path.rstrip("/").endswith("/metrics"):
        add_metrics_text(report, _read_url(url).decode("utf-8", "replace"), url)
        report.notes.append(
            f"{url} is one scrape: it has no time axis (a Prometheus server or a log does)."
        )
        return
    data = _api(url, "/api/v1/query", {"query": '{__name__=~"ctxtrace_.+"}'})
    samples: list[Sample] = []
    for series in data.get("result", []):
        metric = dict(series["metric"])
        name = metric.pop("__name__", "")
        samples.append((name, metric, float(series["value"][1])))
    used = add_samples(report, samples)
    end = time.time()
    start = end - since_s
    step = max(1, math.ceil(since_s / 300))
    queries = {
        "": "sum by (worker, anomaly) (ctxtrace_anomalies_total)",
        "out_of_context_access": "sum by (worker) (ctxtrace_out_of_context_access_total)",
    }
    for fixed, query in queries.items():
        ranged = _api(
            url, "/api/v1/query_range",
            {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)},
        )
        for series in ranged.get("result", []):
            labels = series["metric"]
            anomaly = fixed or labels.get("anomaly", "?")
            worker = labels.get("worker", "?")
            previous: float | None = None
            for index, (at, raw) in enumerate(series["values"]):
                value = float(raw)
                # A series that starts inside the range started from zero then; one that was
                # already there at the start only counts what happened since.
                base = previous if previous is not None else (
                    value if index == 0 and float(at) <= start + step else 0.0
                )
                if value > base:
                    report.timeline.append((float(at), worker, anomaly, int(value - base)))
                previous = value
    report.sources.append(f"Prometheus {url} ({used} ctxtrace series, last {_duration(since_s)})")


# -- logs --------------------------------------------------------------------------------


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


_DETAILS: Final = ("proxy", "phase", "unit", "started_by", "pushed_in", "reason", "thread")


_DECODER: Final = json.JSONDecoder()


def json_objects(line: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON objects on one line, and whether anything on it was not one.

    Usually one object; several when processes sharing a stream spliced their lines
    together (``{...}{...}``), which older writers did.
    """
    text = line.strip()
    found: list[dict[str, Any]] = []
    position = 0
    while position < len(text):
        if text[position] != "{":
            return found, True
        try:
            value, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return found, True
        if not isinstance(value, dict):
            return found, True
        found.append(value)
        while position < len(text) and text[position].isspace():
            position += 1
    return found, False


def add_log_lines(report: Report, lines: Iterable[str], source: str) -> int:
    """Fold ``ctxtrace.*`` JSON log lines into the report; returns how many were used.

    Lines that are not JSON objects (a server's own output interleaved on stderr) are
    skipped and counted in ``skipped_lines``.
    """
    used = 0
    for line in lines:
        if not line.strip():
            continue
        entries, rest = json_objects(line)
        if rest:
            report.skipped_lines += 1
        for entry in entries:
            if _add_entry(report, entry):
                used += 1
    report.sources.append(f"log {source} ({used} ctxtrace lines)")
    return used


def _add_entry(report: Report, entry: dict[str, Any]) -> bool:
    event = entry.get("event")
    worker = entry.get("worker")
    if not isinstance(event, str) or not event.startswith(_EVENT_PREFIX):
        return False
    if not isinstance(worker, str):
        worker = f"?:{entry.get('pid', '?')}:?"
    name = event.removeprefix(_EVENT_PREFIX)
    stats = report.worker(worker)
    if isinstance(entry.get("app"), str):
        stats.apps.add(entry["app"])
    if name in ("push", "pop"):
        kind = stats.kind(str(entry.get("kind", "")))
        if name == "push":
            if not stats.has_metrics:
                kind.pushes += 1
        elif isinstance(entry.get("duration_s"), int | float) and not kind.buckets:
            kind.durations.append(float(entry["duration_s"]))
        return True
    anomaly = str(entry.get("anomaly") or name)
    if anomaly not in ANOMALY_ORDER:
        return False  # config_error, internal_error...: not an anomaly
    count = 1 + int(entry.get("suppressed_since_last") or 0)
    stats.log_anomalies[anomaly] += count
    at = _timestamp(entry.get("timestamp"))
    if at is not None:
        report.timeline.append((at, worker, anomaly, count))
    _add_culprit(report, entry, anomaly, worker, count, at)
    return True


def _add_culprit(
    report: Report, entry: dict[str, Any], anomaly: str, worker: str, count: int, at: float | None
) -> None:
    site = str(entry.get("site") or "?")
    culprit = report.culprits.get((anomaly, site))
    if culprit is None:
        culprit = report.culprits[(anomaly, site)] = Culprit(anomaly, site)
    culprit.count += count
    culprit.workers[worker] += count
    if culprit.function is None and isinstance(entry.get("function"), str):
        culprit.function = entry["function"]
    if culprit.top_site is None and entry.get("top_site"):
        culprit.top_site = str(entry["top_site"])
    if at is not None and (culprit.first_seen is None or at < culprit.first_seen):
        culprit.first_seen = at
    for key in _DETAILS:
        value = entry.get(key)
        if value not in (None, ""):
            culprit.details.setdefault(key, Counter())[str(value)] += count


def add_log_file(report: Report, path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as lines:
        return add_log_lines(report, lines, str(path))


# -- text -------------------------------------------------------------------------------


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


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _kinds_line(stats: WorkerStats) -> str:
    if not stats.kinds:
        return "n/a (no metrics and no push/pop log lines)"
    return "  ".join(f"{kind} {stats.kinds[kind].pushes:.0f}" for kind in sorted(stats.kinds))


def _lifetimes_line(stats: WorkerStats) -> str:
    parts = []
    for kind in sorted(stats.kinds):
        k = stats.kinds[kind]
        if k.finished:
            parts.append(
                f"{kind}: p50 {format_seconds(k.quantile(0.5))}, "
                f"p99 {format_seconds(k.quantile(0.99))}"
            )
    return "   ".join(parts) if parts else "n/a"


def explain(culprit: Culprit, explainer: Explain | None) -> Explanation:
    found = explainer(culprit) if explainer is not None else None
    if found is not None:
        return found
    return Explanation("", "", FIXES.get(culprit.anomaly, f"see {RUNBOOK}"))


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
        out.append(f"  contexts   {_kinds_line(stats)}")
        out.append(f"  lifetime   {_lifetimes_line(stats)}")
        anomalies = stats.anomalies
        if not anomalies:
            out.append("  anomalies  none")
            continue
        out.append("  anomalies")
        for anomaly in sorted(anomalies, key=_order):
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
                    out.append(wrap.fill(label + info.cause))
                wrap.initial_indent = "        fix:   "
                out.append(wrap.fill(info.fix))
    if idle:
        out.append("")
        out.append("no contexts or anomalies: " + ", ".join(sorted(idle)))
    if not report.workers:
        out.append("")
        out.append("nothing from ctxtrace in these sources")
    for note in report.notes:
        out.append("")
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"


# -- plots ------------------------------------------------------------------------------


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
    for anomaly in sorted(by_anomaly, key=_order):
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


# -- HTML -------------------------------------------------------------------------------

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{font-size:90%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
.muted{color:#666}img{max-width:100%}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def render_html(report: Report, explainer: Explain | None = None, png: bytes | None = None) -> str:
    """A self-contained HTML page: the panels (when matplotlib is there) and the tables."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(report.title)}</h1><ul class='muted'>",
        *(f"<li>{_e(s)}</li>" for s in report.sources),
        "</ul>",
    ]
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt='ctxtrace report panels' src='data:image/png;base64,{encoded}'>")
    else:
        parts.append(
            "<p class='note'>The plots (lifetimes per worker, anomalies over time, top culprit "
            f"sites) need matplotlib: <code>{_e(INSTALL_HINT)}</code>. The tables below have "
            "the same numbers.</p>"
        )
    for note in report.notes:
        parts.append(f"<p class='note'>{_e(note)}</p>")
    parts.append("<h2>Workers</h2><table><tr><th>worker</th><th>contexts</th>"
                 "<th>lifetime p50 / p99</th><th>anomalies</th><th>from</th></tr>")
    for stats in sorted(report.workers.values(), key=lambda w: w.worker):
        anomalies = ", ".join(
            f"{name} {count}" for name, count in sorted(stats.anomalies.items(),
                                                        key=lambda i: _order(i[0]))
        ) or "none"
        parts.append(
            f"<tr><td><code>{_e(stats.worker)}</code></td><td>{_e(_kinds_line(stats))}</td>"
            f"<td>{_e(_lifetimes_line(stats))}</td><td>{_e(anomalies)}</td>"
            f"<td>{'metrics' if stats.has_metrics else 'log'}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Anomalies and the lines behind them</h2>")
    if not report.culprits:
        parts.append(
            "<p>No log lines given: metric labels never carry code locations. Add "
            "<code>--log FILE</code> with the workers' JSON lines to see the sites.</p>"
        )
    else:
        parts.append(
            "<table><tr><th>anomaly</th><th>count</th><th>site (file:line)</th>"
            "<th>workers</th><th>details</th><th>cause and fix</th></tr>"
        )
        for culprit in report.ordered_culprits():
            info = explain(culprit, explainer)
            where = f"<code>{_e(short_site(culprit.site))}</code>"
            if culprit.function:
                where += f"<br>in <code>{_e(culprit.function)}</code>"
            if culprit.top_site and culprit.top_site != culprit.site:
                where += f"<br>on top: <code>{_e(short_site(culprit.top_site))}</code>"
            workers = "<br>".join(
                f"{_e(w)} &times;{n}" for w, n in sorted(culprit.workers.items())
            )
            details = "<br>".join(
                f"{_e(key)}: {_e(', '.join(sorted(values)))}"
                for key, values in sorted(culprit.details.items())
                if key != "thread"
            )
            cause = f"<b>{_e(info.label)}</b>: {_e(info.cause)}<br>" if info.cause else ""
            anchor = f"{RUNBOOK}#{culprit.anomaly}"
            parts.append(
                f"<tr><td><a href='{_e(anchor)}'>{_e(culprit.anomaly)}</a></td>"
                f"<td>{culprit.count}</td><td>{where}</td><td>{workers}</td><td>{details}</td>"
                f"<td>{cause}<b>fix</b>: {_e(info.fix)}</td></tr>"
            )
        parts.append("</table>")
    parts.append(
        f"<p class='muted'>Made by ctxtrace report on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC. What each anomaly means and how "
        f"to fix it: {_e(RUNBOOK)}.</p></body></html>"
    )
    return "\n".join(parts)


def write_outputs(
    report: Report, html_path: Path, explainer: Explain | None = None, png_path: Path | None = None
) -> bytes | None:
    """Write the HTML (and the PNG, when asked and matplotlib is there); returns the PNG."""
    png = figure_png(report)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(report, explainer, png), encoding="utf-8")
    if png_path is not None and png is not None:
        png_path.write_bytes(png)
    return png


# -- the command ------------------------------------------------------------------------


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
    parser.set_defaults(handler=run)
    return parser


def _metric_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.prom"))
    return [path]


def build(args: argparse.Namespace) -> Report:
    """The report from the parsed arguments; raises ``OSError``/``ValueError`` on a bad source."""
    report = Report(title=args.title)
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

