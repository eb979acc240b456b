"""Checks on dashboards/alerts.yml: syntax, unit tests, and the conventions on-call relies on."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REQUIRED_ALERTS = {
    "CtxtraceUnbalancedStack",
    "CtxtraceOutOfContextAccess",
    "CtxtraceContextsAccumulating",
    "CtxtraceLongLivedContext",
    "CtxtraceAgentErrors",
    "CtxtraceTelemetryDropped",
    "CtxtraceTargetDown",
    "CtxtraceMetricsAbsent",
}
# Alerts about the monitoring itself: they name a job, not a worker.
FLEET_ALERTS = {"CtxtraceTargetDown", "CtxtraceMetricsAbsent"}
DEFECTS = Path(__file__).with_name("alerts_defects_test.yml")
BEFORE = Path(__file__).with_name("alerts_before_issue17.yml")
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
    """The alerts the runbook and on-call expect are all defined, each once per severity."""
    names = [(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules]
    assert len(names) == len(set(names))
    assert {name for name, _ in names} >= REQUIRED_ALERTS
    assert all(name.startswith("Ctxtrace") for name, _ in names)


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
        if name not in FLEET_ALERTS:
            assert "$labels.worker" in notes["description"], name
        if any(metric in rule["expr"] for metric in METRICS_WITH_APP):
            assert "$labels.app" in notes["description"], name
        assert notes["runbook_url"].startswith("http"), name
        assert notes["dashboard_url"].startswith("http"), name


def test_every_alert_is_unit_tested_both_ways(
    alert_rules: list[dict[str, Any]], paths: dict[str, Path]
) -> None:
    """Each alert has a case where it fires and a case where it must stay silent
    (in alerts_test.yml or alerts_defects_test.yml)."""
    cases = _cases(paths["alerts_test"]) + _cases(DEFECTS)
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
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
    fors = [
        rule["for"] for group in rewritten["groups"] for rule in group["rules"]
        if rule["alert"] not in FLEET_ALERTS
    ]
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
        zero = str(rule["for"]).strip("0smh") == ""
        wanted = rule["for"] if zero or rule["alert"] in FLEET_ALERTS else "3s"
        assert fors[rule["alert"]] == wanted, rule["alert"]
    assert set(fors.values()) - {"15m"} == {"0m", "3s"}
    result = run(promtool, "check", "rules", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr


def _cases(path: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]
    return cases


@pytest.mark.parametrize("case", _cases(DEFECTS), ids=lambda case: case["name"][:40])
def test_each_defect_case_fails_before_and_passes_now(
    promtool: str, paths: dict[str, Path], tmp_path: Path, case: dict[str, Any]
) -> None:
    """Each case of alerts_defects_test.yml passes on alerts.yml; each "defect" case fails
    on the rules as they were before issue 17 (so it tests the fix, not just the syntax)."""
    results = {}
    for label, rules in (("now", paths["alerts"]), ("before", BEFORE)):
        single = tmp_path / f"{label}.yml"
        single.write_text(
            yaml.safe_dump(
                {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [case]}
            ),
            encoding="utf-8",
        )
        result = run(promtool, "test", "rules", str(single))
        results[label] = result
    assert results["now"].returncode == 0, results["now"].stdout + results["now"].stderr
    if case["name"].startswith("defect"):
        assert results["before"].returncode != 0, "passes on the old rules: not a defect test"


def test_generated_rules_are_current(paths: dict[str, Path]) -> None:
    """alerts.yml is what rules.py makes of config.yaml (edit the config, not the output)."""
    import importlib.util  # noqa: PLC0415 - dashboards/ is not a package

    source = paths["dashboards"] / "rules.py"
    spec = importlib.util.spec_from_file_location("ctxtrace_rules", source)
    assert spec is not None
    assert spec.loader is not None
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    text = rules.render(rules.load_config())
    assert paths["alerts"].read_text(encoding="utf-8") == text, "run python dashboards/generate.py"


def test_every_anomaly_has_one_severity(paths: dict[str, Path]) -> None:
    """Each anomaly the agent reports either pages, opens a ticket, or has its own alert."""
    from ctxtrace._events import ANOMALIES  # noqa: PLC0415 - the agent's own table

    config = yaml.safe_load((paths["dashboards"] / "config.yaml").read_text(encoding="utf-8"))
    page = set(config["unbalanced_stack"]["page"]["anomalies"])
    ticket = set(config["unbalanced_stack"]["ticket"]["anomalies"])
    assert not page & ticket
    assert page | ticket | {"long_lived"} == set(ANOMALIES)
