"""Checks on dashboards/alerts.yml: syntax, unit tests, and the conventions on-call relies on."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RUNBOOK_URL = "https://github.com/ctxtrace/ctxtrace/blob/main/docs/runbook.md#"
REQUIRED_ALERTS = {
    "CtxtraceUnbalancedStack",
    "CtxtraceOutOfContextAccess",
    "CtxtraceContextsAccumulating",
    "CtxtraceLongLivedContext",
    "CtxtraceAgentErrors",
}
# Metrics that carry an `app` label; a description should name the app when it can.
METRICS_WITH_APP = (
    "ctxtrace_context_duration_seconds",
    "ctxtrace_contexts_active",
    "ctxtrace_contexts_total",
    "ctxtrace_anomalies_total",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a tool, keeping its output for the assertion message."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules(promtool: str, paths: dict[str, Path]) -> None:
    """The rules file is valid Prometheus rule syntax with valid PromQL and templates."""
    result = run(promtool, "check", "rules", str(paths["alerts"]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests(promtool: str, paths: dict[str, Path]) -> None:
    """Every case in alerts_test.yml passes: alerts fire when they must, and only then."""
    result = run(promtool, "test", "rules", str(paths["alerts_test"]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist(alert_rules: list[dict[str, Any]]) -> None:
    """The alerts the runbook and on-call expect are all defined, each once."""
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    assert all(name.startswith("Ctxtrace") for name in names)


def test_labels_and_annotations(alert_rules: list[dict[str, Any]]) -> None:
    """severity routes the page/ticket; summary is static; description names worker and app.

    That each runbook_url anchor exists in docs/runbook.md is checked in test_runbook.py.
    """
    for rule in alert_rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert "for" in rule, f"{name}: give it an explicit for, tests rewrite it"
        notes = rule["annotations"]
        assert "{{" not in notes["summary"], f"{name}: summary must be static"
        assert "$labels.worker" in notes["description"], name
        if any(metric in rule["expr"] for metric in METRICS_WITH_APP):
            assert "$labels.app" in notes["description"], name
        assert notes["runbook_url"] == RUNBOOK_URL + name.lower(), name


def test_every_alert_is_unit_tested_both_ways(
    alert_rules: list[dict[str, Any]], paths: dict[str, Path]
) -> None:
    """Each alert has a case where it fires and a case where it must stay silent."""
    cases = yaml.safe_load(paths["alerts_test"].read_text(encoding="utf-8"))["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for rule in alert_rules:
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']} never fires"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']} never silent"


def test_for_values_can_be_rewritten(
    promtool: str,
    paths: dict[str, Path],
    tmp_path: Path,
    rules_with_for: Callable[[Path, Path, str], Path],
) -> None:
    """A copy with every `for` shortened is still a valid rules file (live tests use it)."""
    copy = rules_with_for(paths["alerts"], tmp_path / "alerts.yml", "1s")
    rewritten = yaml.safe_load(copy.read_text(encoding="utf-8"))
    fors = [rule["for"] for group in rewritten["groups"] for rule in group["rules"]]
    assert fors
    assert set(fors) == {"1s"}
    result = run(promtool, "check", "rules", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr


def test_for_rewrite_can_keep_zero_waits(
    promtool: str,
    paths: dict[str, Path],
    tmp_path: Path,
    alert_rules: list[dict[str, Any]],
    rules_with_for: Callable[..., Path],
) -> None:
    """With keep_zero, `0m` rules keep firing at once and only real waits are shortened."""
    copy = rules_with_for(paths["alerts"], tmp_path / "alerts.yml", "3s", keep_zero=True)
    rewritten = yaml.safe_load(copy.read_text(encoding="utf-8"))
    fors = {r["alert"]: r["for"] for g in rewritten["groups"] for r in g["rules"]}
    for rule in alert_rules:
        wanted = rule["for"] if str(rule["for"]).strip("0smh") == "" else "3s"
        assert fors[rule["alert"]] == wanted, rule["alert"]
    assert set(fors.values()) == {"0m", "3s"}
    result = run(promtool, "check", "rules", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
