"""Where a report's numbers come from: Prometheus (a server, an endpoint or saved text) and logs."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from ctxtrace.commands.report.model import ANOMALY_ORDER, Culprit, Report

# -- metrics ----------------------------------------------------------------------------

EVENT_PREFIX: Final = "ctxtrace."

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
    if not isinstance(event, str) or not event.startswith(EVENT_PREFIX):
        return False
    name = event.removeprefix(EVENT_PREFIX)
    anomaly = str(entry.get("anomaly") or name)
    if name not in ("push", "pop") and anomaly not in ANOMALY_ORDER:
        # config_error, internal_error...: not an anomaly, and no reason to list a worker
        # (such lines may come from a process that has no worker name yet).
        return False
    if not isinstance(worker, str):
        pid = entry.get("pid")
        if pid is None:
            return False  # nothing to say whose it is: no phantom "?:?:?" worker
        worker = f"?:{pid}:?"
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
    # A line is one occurrence plus those the rate limit held back since the site's last
    # line; a summary line (a window that passed, or the last one at exit) only for those.
    held_back = int(entry.get("suppressed_since_last") or 0)
    count = held_back if entry.get("summary") is True else 1 + held_back
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


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
