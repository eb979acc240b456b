"""The report's model: per-worker counts and lifetimes, and the culprit lines of code."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from ctxtrace._events import ANOMALY_KINDS

#: Every anomaly, in the order reports list them.
ANOMALY_ORDER: Final = tuple(kind.name for kind in ANOMALY_KINDS)
#: Where the runbook is in ctxtrace's source; reports link to it only when told its URL
#: (``--runbook-url``): a relative link would not resolve from wherever the HTML is opened.
RUNBOOK: Final = "docs/runbook.md"

#: The general fix for each anomaly (the runbook's "Fix" lines); a caller that knows the
#: application better (``ctxtrace demo`` knows its seeded faults) can say more.
FIXES: Final[dict[str, str]] = {kind.name: kind.fix for kind in ANOMALY_KINDS}




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
    #: counts once plus its ``suppressed_since_last``; a ``summary`` line only the latter).
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
    #: The runbook's address (anchors are anomaly names); None: no links, the fixes inline.
    runbook_url: str | None = None

    def worker(self, name: str) -> WorkerStats:
        stats = self.workers.get(name)
        if stats is None:
            stats = self.workers[name] = WorkerStats(name)
        return stats

    def ordered_culprits(self) -> list[Culprit]:
        culprits = self.culprits.values()
        return sorted(culprits, key=lambda c: (-c.count, anomaly_rank(c.anomaly), c.site))

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


def anomaly_rank(anomaly: str) -> int:
    """Where ``anomaly`` comes in the report's order (unknown names last)."""
    return ANOMALY_ORDER.index(anomaly) if anomaly in ANOMALY_ORDER else len(ANOMALY_ORDER)


def explain(culprit: Culprit, explainer: Explain | None) -> Explanation:
    found = explainer(culprit) if explainer is not None else None
    if found is not None:
        return found
    return Explanation("", "", FIXES.get(culprit.anomaly, f"see {RUNBOOK}"))
