"""Fixtures shared by the dashboard, alert-rule and exporter-config checks.

Helpers are handed out as fixtures rather than imported, so these tests work under any
pytest import mode next to the package's own tests/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
EXPORTERS = REPO / "exporters"


def _missing(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where a skip would hide a lost check."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def paths() -> dict[str, Path]:
    """Where the checked files live, independent of the directory pytest runs from."""
    return {
        "repo": REPO,
        "dashboards": DASHBOARDS,
        "exporters": EXPORTERS,
        "alerts": DASHBOARDS / "alerts.yml",
        "alerts_test": DASHBOARDS / "tests" / "alerts_test.yml",
        "dashboard_json": DASHBOARDS / "flask-contexts.json",
        "runbook": REPO / "docs" / "runbook.md",
    }


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str, str], str]:
    """Return a function that finds a binary or skips/fails with the install hint."""

    def find(name: str, install_hint: str) -> str:
        path = shutil.which(name)
        if path is None:
            _missing(f"{name} is not on PATH; install it with: {install_hint}")
            raise AssertionError("unreachable")  # pytest.skip/fail raise
        return path

    return find


PROMETHEUS_APT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"


@pytest.fixture(scope="session")
def promtool(require_tool: Callable[[str, str], str]) -> str:
    """promtool, shipped with Debian's prometheus package."""
    return require_tool("promtool", PROMETHEUS_APT)


@pytest.fixture(scope="session")
def amtool(require_tool: Callable[[str, str], str]) -> str:
    """amtool, shipped with Debian's prometheus-alertmanager package."""
    return require_tool("amtool", PROMETHEUS_APT)


@pytest.fixture(scope="session")
def generator() -> ModuleType:
    """dashboards/generate.py loaded by path (dashboards/ is not an installed package)."""
    try:
        import grafana_foundation_sdk  # noqa: F401, PLC0415 (only probing that it is installed)
    except ImportError:
        _missing(
            "grafana-foundation-sdk is not installed: pip install -r dashboards/requirements.txt"
        )
    spec = importlib.util.spec_from_file_location(
        "ctxtrace_dashboard_generate", DASHBOARDS / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dashboard(paths: dict[str, Path]) -> dict[str, Any]:
    """The committed dashboard JSON, as Grafana would import it."""
    data: dict[str, Any] = json.loads(paths["dashboard_json"].read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="session")
def alert_rules(paths: dict[str, Path]) -> list[dict[str, Any]]:
    """Every alerting rule in dashboards/alerts.yml."""
    data = yaml.safe_load(paths["alerts"].read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def write_rules_with_for(source: Path, target: Path, duration: str) -> Path:
    """Copy an alert rules file with every `for` set to `duration`.

    Tests against a real Prometheus cannot wait 15 minutes; the rules keep literal `for`
    values so that this rewrite is a plain YAML edit.
    """
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = duration
    target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def rules_with_for() -> Callable[[Path, Path, str], Path]:
    """The rewrite above, as a fixture (see the module docstring for why)."""
    return write_rules_with_for
