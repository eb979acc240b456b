"""Fixtures shared by the dashboard, alert-rule and exporter-config checks.

Helpers are handed out as fixtures rather than imported, so these tests work under any
pytest import mode next to the package's own tests/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
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
def missing() -> Callable[[str], None]:
    """Skip with the reason on a developer machine, fail with it when CI is set."""
    return _missing


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


#: Alerts about the monitoring itself keep their `for` in live tests: a stack that is
#: starting has no targets and no ctxtrace series yet, which is what they alert on.
KEEP_FOR = frozenset({"CtxtraceTargetDown", "CtxtraceMetricsAbsent"})


def write_rules_with_for(
    source: Path,
    target: Path,
    duration: str,
    *,
    keep_zero: bool = False,
    keep: frozenset[str] = KEEP_FOR,
) -> Path:
    """Copy an alert rules file with every `for` set to `duration`.

    Tests against a real Prometheus cannot wait 15 minutes; the rules keep literal `for`
    values so that this rewrite is a plain YAML edit. `keep_zero`: rules whose `for` is
    0 keep it, so only waits are shortened and none is added. Alerts named in `keep`
    keep their `for`.
    """
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule or rule["alert"] in keep:
                continue
            if not (keep_zero and _is_zero(str(rule.get("for", "0")))):
                rule["for"] = duration
    target.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target


def _is_zero(duration: str) -> bool:
    """True for a Prometheus duration of nothing: 0, 0s, 0m, 0h0m..."""
    return not any(char in "123456789" for char in duration)


@pytest.fixture(scope="session")
def rules_with_for() -> Callable[..., Path]:
    """The rewrite above, as a fixture (see the module docstring for why)."""
    return write_rules_with_for


@pytest.fixture(scope="session")
def livestack() -> ModuleType:
    """tests/livestack.py: real Prometheus and Alertmanager servers, loaded by path.

    Registered in sys.modules under a name of its own before it runs: its dataclasses
    look their module up there.
    """
    name = "ctxtrace_dashboards_livestack"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            name, DASHBOARDS / "tests" / "livestack.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def start_stack(
    livestack: ModuleType,
    server_binaries: Any,
    tmp_path_factory: pytest.TempPathFactory,
    paths: dict[str, Path],
) -> Callable[..., AbstractContextManager[Any]]:
    """``start_stack(name, duration, *, keep_zero=False, worker=None, timing=None)``:
    livestack.live_stack in a new temp folder named `name`, with the shipped configs,
    every `for` in alerts.yml set to `duration` (see `write_rules_with_for`) and
    Alertmanager's route `timing` (no waits by default).

    A live test then names only what is its own; the servers, folders and configs it
    needs are the same for every one.
    """

    def start(
        name: str,
        duration: str,
        *,
        keep_zero: bool = False,
        worker: tuple[str, Callable[[int], str]] | None = None,
        timing: dict[str, str] | None = None,
    ) -> AbstractContextManager[Any]:
        tmp = tmp_path_factory.mktemp(name)
        rules = write_rules_with_for(
            paths["alerts"], tmp / "alerts.yml", duration, keep_zero=keep_zero
        )
        return livestack.live_stack(
            tmp, server_binaries, paths["exporters"], rules, worker,
            livestack.NO_WAIT if timing is None else timing,
        )

    return start


@pytest.fixture(scope="session")
def server_binaries(require_tool: Callable[[str, str], str], livestack: ModuleType) -> Any:
    """Prometheus and Alertmanager (a livestack.Binaries), or skip/fail naming the package."""
    return livestack.Binaries(
        require_tool("prometheus", PROMETHEUS_APT),
        require_tool("prometheus-alertmanager", PROMETHEUS_APT),
    )
