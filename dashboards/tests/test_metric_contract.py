"""Every metric, label and label value the dashboard and alerts use is in the agent's contract.

A renamed metric or a filter on a label the metric does not carry would not fail anywhere
else: the panel would just be empty and the alert would never fire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The contract, written out here independently of dashboards/generate.py on purpose.
BASE = {"job", "instance"}  # added by Prometheus to every scraped series
CONTRACT: dict[str, set[str]] = {
    "ctxtrace_context_duration_seconds_bucket": {"kind", "app", "worker", "le"},
    "ctxtrace_context_duration_seconds_sum": {"kind", "app", "worker"},
    "ctxtrace_context_duration_seconds_count": {"kind", "app", "worker"},
    "ctxtrace_contexts_active": {"kind", "app", "worker"},
    "ctxtrace_context_depth_max": {"worker"},
    "ctxtrace_contexts_total": {"kind", "app", "worker"},
    "ctxtrace_anomalies_total": {"anomaly", "kind", "app", "worker"},
    "ctxtrace_out_of_context_access_total": {"proxy", "phase", "outcome", "worker"},
    "ctxtrace_internal_errors_total": {"component", "worker"},
    "ctxtrace_dropped_total": {"what", "worker"},
    # prometheus_client's process collector, served on each worker's endpoint; `worker`
    # comes from the target file's labels, as for every series of that target.
    "process_start_time_seconds": {"worker"},
    "process_resident_memory_bytes": {"worker"},
    "process_cpu_seconds_total": {"worker"},
    # Prometheus' own series about each scrape of a worker.
    "up": {"worker"},
    "scrape_duration_seconds": {"worker"},
}
VALUES: dict[str, set[str]] = {
    "kind": {"app", "request"},
    "anomaly": {"leaked", "long_lived", "wrong_pop", "double_pop", "foreign_pop", "stale_context"},
    "proxy": {"current_app", "g", "request", "session", "app_ctx", "request_ctx"},
    "phase": {"import", "runtime"},
    "outcome": {"escaped", "handled"},
}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@dataclass
class Selector:
    """A metric name and the label matchers written after it."""

    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Parsed:
    """What a PromQL expression reads: selectors, and labels named in by()/on() lists."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def _closing(expr: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at `start` (strings skipped)."""
    depth, index = 0, start
    while index < len(expr):
        char = expr[index]
        if char == '"':
            index = _string_end(expr, index)
        elif char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unbalanced {opening} in {expr!r}")


def _string_end(expr: str, start: int) -> int:
    """Index of the quote that ends the string opened at `start`."""
    index = start + 1
    while expr[index] != '"':
        index += 2 if expr[index] == "\\" else 1
    return index


def parse(expr: str) -> Parsed:
    """A small PromQL scanner: enough for the expressions we write, not a full parser."""
    expr = re.sub(r"#[^\n]*", "", expr)  # comments; none of our strings contain '#'
    parsed = Parsed()
    index = 0
    while index < len(expr):
        char = expr[index]
        if char == "[":  # range or subquery duration
            index = _closing(expr, index, "[", "]")
            continue
        if char == "{":  # matchers without a metric name would be a contract hole
            raise AssertionError(f"selector without a metric name in {expr!r}")
        word = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", expr[index:])
        if not word or (index and (expr[index - 1].isalnum() or expr[index - 1] in "._$")):
            index += 1
            continue
        name = word.group(0)
        index += len(name)
        rest = expr[index:]
        stripped = rest.lstrip()
        skip = len(rest) - len(stripped)
        if name in GROUPING and stripped.startswith("("):
            end = _closing(expr, index + skip, "(", ")")
            parsed.grouping |= {
                w.strip() for w in expr[index + skip + 1 : end - 1].split(",") if w.strip()
            }
            index = end
        elif (
            name in KEYWORDS or stripped.startswith("(") or re.match(r"(by|without)\s*\(", stripped)
        ):
            continue  # operator, modifier, function, or aggregation (`sum by (...) (...)`)
        else:
            selector = Selector(name)
            if stripped.startswith("{"):
                end = _closing(expr, index + skip, "{", "}")
                selector.matchers = MATCHER.findall(expr[index + skip : end])
                index = end
            parsed.selectors.append(selector)
    return parsed


def check_expression(expr: str, where: str) -> None:
    """Assert that one expression only reads contract metrics, labels and values."""
    parsed = parse(expr)
    assert parsed.selectors, f"{where}: no metric in {expr!r}"
    labels_in_play = set(BASE)
    for selector in parsed.selectors:
        assert selector.metric in CONTRACT, f"{where}: {selector.metric} is not in the contract"
        allowed = CONTRACT[selector.metric] | BASE
        labels_in_play |= allowed
        for label, op, value in selector.matchers:
            assert label in allowed, f"{where}: {selector.metric} has no label {label!r}"
            if label in VALUES and "$" not in value:
                values = value.split("|") if op in {"=~", "!~"} else [value]
                assert set(values) <= VALUES[label], f"{where}: {label}={value!r}"
    assert parsed.grouping <= labels_in_play, (
        f"{where}: groups by {parsed.grouping - labels_in_play}"
    )


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query target in every panel."""
    return [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_scanner_finds_what_it_should() -> None:
    """The scanner tells metrics from functions, keywords, grouping labels and ranges."""
    parsed = parse(
        'histogram_quantile(0.9, sum by (le, worker) (rate(ctxtrace_contexts_total{app=~"$app",'
        ' kind="app"}[$__rate_interval]))) or on (worker) ctxtrace_dropped_total offset 5m'
    )
    assert [s.metric for s in parsed.selectors] == [
        "ctxtrace_contexts_total",
        "ctxtrace_dropped_total",
    ]
    assert parsed.selectors[0].matchers == [("app", "=~", "$app"), ("kind", "=", "app")]
    assert parsed.grouping == {"le", "worker"}


def test_dashboard_uses_only_contract_metrics(dashboard: dict[str, Any]) -> None:
    """Dashboard queries read contract metrics with contract labels and values only."""
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 10
    for where, expr in expressions:
        check_expression(expr, where)


def test_dashboard_variables_use_contract_metrics(dashboard: dict[str, Any]) -> None:
    """label_values() variables read a contract metric and one of its labels."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
        assert match, variable["query"]
        check_expression(match.group(1), f"variable {variable['name']}")
        metric = parse(match.group(1)).selectors[0].metric
        assert match.group(2) in CONTRACT[metric] | BASE


def test_alerts_use_only_contract_metrics(alert_rules: list[dict[str, Any]]) -> None:
    """Alert expressions read contract metrics with contract labels and values only."""
    for rule in alert_rules:
        check_expression(rule["expr"], rule["alert"])


def test_every_contract_metric_is_shown(dashboard: dict[str, Any]) -> None:
    """Each contract metric family appears somewhere on the dashboard."""
    used = {s.metric for _, expr in dashboard_expressions(dashboard) for s in parse(expr).selectors}
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    wanted = {re.sub(r"_(bucket|sum|count)$", "", name) for name in CONTRACT}
    # The start time is for the alert rules, not for a panel.
    assert families == wanted - {"process_start_time_seconds"}
