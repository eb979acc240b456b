"""Checks on the generated Grafana dashboard: freshness, variables, and query conventions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels that run queries (rows only group them; text panels hold the runbook)."""
    return [panel for panel in dashboard["panels"] if panel["type"] not in {"row", "text"}]


def test_committed_json_is_generator_output(
    generator: ModuleType, dashboard: dict[str, Any], paths: dict[str, Path]
) -> None:
    """Regenerating gives the committed file byte for byte: nobody hand-edited it."""
    committed = paths["dashboard_json"].read_text(encoding="utf-8")
    assert generator.render() == committed, "stale: run python dashboards/generate.py"
    assert generator.main(["--check"]) == 0


def test_panel_types_are_grafana_panels(dashboard: dict[str, Any]) -> None:
    """Each panel type is a Grafana panel plugin the SDK knows (the schema types `type` as
    any string, so the type check cannot catch a misspelt one)."""
    import importlib.util  # noqa: PLC0415 - only here

    for panel in dashboard["panels"]:
        kind = panel["type"]
        known = kind == "row" or importlib.util.find_spec(
            f"grafana_foundation_sdk.builders.{kind}"
        )
        assert known, f"{panel['title']}: unknown panel type {kind!r}"


def test_identity(dashboard: dict[str, Any]) -> None:
    """A stable uid keeps links and provisioning working across re-imports."""
    assert dashboard["uid"] == "ctxtrace-flask-contexts"
    assert dashboard["title"] == "Flask contexts"
    assert {"ctxtrace", "flask"} <= set(dashboard["tags"])
    assert dashboard["schemaVersion"] >= 39  # Grafana 11 and later


def test_variables(dashboard: dict[str, Any]) -> None:
    """datasource picks a Prometheus; job, host and worker cascade; "All" is a regex.

    The lists come from a series every agent exports from its start (so a process that
    has served nothing yet is listed), and "All" is ``.*`` rather than every
    host:pid:role ever seen.
    """
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "host", "app", "worker"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "host", "app", "worker"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["query"].startswith("label_values(")
        assert variable["includeAll"]
        assert variable["multi"]
        assert variable["allValue"] == ".*", name
    for name in ("job", "host", "worker"):
        assert "ctxtrace_dropped_total" in variables[name]["query"], name
    assert variables["host"]["regex"] == "/^([^:]+):/"
    assert "$job" in variables["host"]["query"]
    assert "$job" in variables["worker"]["query"]
    assert "$host" in variables["worker"]["query"]


def test_firing_alerts_are_annotations(dashboard: dict[str, Any]) -> None:
    """Firing ctxtrace alerts show on the time series panels."""
    (annotation,) = dashboard["annotations"]["list"]
    assert annotation["datasource"] == DATASOURCE
    assert annotation["target"]["datasource"] == DATASOURCE
    assert 'alertname=~"Ctxtrace.*"' in annotation["target"]["expr"]
    assert annotation["enable"]


def test_runbook_panels_match_the_alerts_links(
    dashboard: dict[str, Any], alert_rules: list[dict[str, Any]]
) -> None:
    """Each alert's default runbook_url opens a text panel holding its runbook section."""
    panels = {panel["id"]: panel for panel in dashboard["panels"]}
    for rule in alert_rules:
        url = rule["annotations"]["runbook_url"]
        match = re.search(r"/d/ctxtrace-flask-contexts/.*viewPanel=panel-(\d+)$", url)
        assert match, url
        panel = panels[int(match.group(1))]
        assert panel["type"] == "text"
        assert panel["options"]["content"].startswith(f"## {rule['alert']}\n")


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """No panel or query is pinned to one Grafana instance's data source uid."""
    for panel in query_panels(dashboard):
        if panel["type"] == "text":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])


def test_every_rate_uses_rate_interval(dashboard: dict[str, Any]) -> None:
    """rate() ranges follow Grafana's $__rate_interval; no range is hard-coded."""
    rates = 0
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for match in re.finditer(r"\b(i?rate)\([^\[]*\[([^\]]+)\]", expr):
                rates += 1
                assert match.group(2) == "$__rate_interval", (panel["title"], expr)
            for duration in re.findall(r"\[([^\]]+)\]", expr):
                assert duration in {"$__rate_interval", "$__range"}, (panel["title"], expr)
            for duration in re.findall(r"\boffset\s+(\$\w+)", expr):
                assert duration in {"$__rate_interval", "$__range"}, (panel["title"], expr)
    assert rates >= 4


def test_filters_follow_the_variables(dashboard: dict[str, Any]) -> None:
    """Every selector is narrowed by the worker variable, and by app where the metric has it."""
    with_app = re.compile(
        r"ctxtrace_(context_duration_seconds_\w+|contexts_active|contexts_total"
        r"|anomalies_total)"
    )
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            selectors = re.findall(
                r"\b(ctxtrace_\w+|process_\w+|up|scrape_duration_seconds)(\{[^}]*\})?",
                target["expr"],
            )
            assert selectors, target["expr"]
            for metric, matchers in selectors:
                for matcher in ('job=~"$job"', 'worker=~"$host:.*"', 'worker=~"$worker"'):
                    assert matcher in matchers, (panel["title"], metric, matcher)
                if with_app.fullmatch(metric):
                    assert 'app=~"$app"' in matchers, (panel["title"], metric)
                else:
                    assert "app=" not in matchers, (panel["title"], metric)


def test_targets_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    """Unique panel ids and refIds, and no two panels share grid cells."""
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)) and all(refs), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_required_views_are_present(dashboard: dict[str, Any]) -> None:
    """The views the runbook sends people to exist, with the right visualisation."""
    panels = query_panels(dashboard)

    def with_expr(fragment: str) -> list[dict[str, Any]]:
        return [p for p in panels if any(fragment in t["expr"] for t in p["targets"])]

    quantiles = with_expr("histogram_quantile(")
    assert quantiles
    assert {t["expr"].split(",")[0] for t in quantiles[0]["targets"]} == {
        "histogram_quantile(0.5",
        "histogram_quantile(0.95",
        "histogram_quantile(0.99",
    }
    assert "by (le, worker, kind)" in quantiles[0]["targets"][0]["expr"]
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps
    assert all(t["format"] == "heatmap" for p in heatmaps for t in p["targets"])
    assert all(p["options"]["calculate"] is False for p in heatmaps)
    assert with_expr("ctxtrace_contexts_active")
    assert with_expr("ctxtrace_context_depth_max")
    assert any(
        "by (anomaly, worker)" in t["expr"]
        for p in with_expr("ctxtrace_anomalies_total")
        for t in p["targets"]
    )
    # Runtime accesses per worker; import-time ones (before the first scrape) as a table.
    accesses = with_expr("ctxtrace_out_of_context_access_total")
    assert any(
        "by (worker, proxy)" in t["expr"] and 'phase="runtime"' in t["expr"]
        for p in accesses
        for t in p["targets"]
    )
    assert any(
        p["type"] == "table" and 'phase="import"' in t["expr"]
        for p in accesses
        for t in p["targets"]
    )
    # The stat counts out-of-context accesses too.
    (total,) = [p for p in panels if p["type"] == "stat"]
    assert "ctxtrace_out_of_context_access_total" in total["targets"][0]["expr"]
    # Spikes between two scrapes are kept.
    (depth,) = with_expr("ctxtrace_context_depth_max")
    assert all("max_over_time(" in t["expr"] for t in depth["targets"])
    health = with_expr("ctxtrace_internal_errors_total")
    assert health
    assert health == [p for p in with_expr("ctxtrace_dropped_total") if p["type"] != "table"]
    for metric in ("up{", "scrape_duration_seconds", "process_resident_memory_bytes",
                   "process_cpu_seconds_total"):
        assert with_expr(metric), metric
    tables = [p for p in panels if p["type"] == "table"]
    assert tables
    assert all(t["format"] == "table" and t["instant"] for t in tables[0]["targets"])
    assert any("ctxtrace_anomalies_total" in t["expr"] for t in tables[0]["targets"])
    # The table counts over the dashboard's range, so a recycled worker keeps its row.
    assert all("$__range" in t["expr"] for t in tables[0]["targets"][1:])


def test_expressions_parse(promtool: str, dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every query is valid PromQL once Grafana's variables are filled in.

    promtool has no bare "parse this query" command, so the queries are written as
    recording rules and checked with `promtool check rules`.
    """
    substitutions = {
        "$__rate_interval": "1m", "$__range": "1h", "$app": "shop", "$worker": "w1",
        "$job": "ctxtrace", "$host": "web-1",
    }
    rules = []
    for number, panel in enumerate(query_panels(dashboard)):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard:panel{number}:{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
