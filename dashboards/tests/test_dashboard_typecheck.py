"""The dashboard JSON type-checks against Grafana's own published Dashboard type."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path


def typecheck(
    require_tool: Callable[[str, str], str], paths: dict[str, Path], *json: Path
) -> subprocess.CompletedProcess[str]:
    """typecheck/run.sh on the committed dashboard, or on `json`."""
    require_tool("npm", "apt-get install -y nodejs npm (Node.js 18 or newer)")
    require_tool("npx", "apt-get install -y nodejs npm (Node.js 18 or newer)")
    script = paths["dashboards"] / "typecheck" / "run.sh"
    return subprocess.run(
        ["bash", str(script), *map(str, json)],
        capture_output=True, text=True, timeout=600, check=False,
    )


def test_dashboard_matches_grafana_schema_types(
    require_tool: Callable[[str, str], str], paths: dict[str, Path]
) -> None:
    """typecheck/run.sh (npm ci, then tsc --noEmit) accepts flask-contexts.json.

    The first run downloads @grafana/schema and TypeScript (about 25 MB); later runs
    reuse npm's cache and take a few seconds.
    """
    result = typecheck(require_tool, paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dashboard typecheck: ok" in result.stdout


def test_a_misspelt_enum_value_fails_the_check(
    require_tool: Callable[[str, str], str], paths: dict[str, Path], tmp_path: Path
) -> None:
    """Enum fields keep their values (a JSON import would widen them to any string)."""
    text = paths["dashboard_json"].read_text(encoding="utf-8")
    assert '"mode": "absolute"' in text
    broken = tmp_path / "broken.json"
    broken.write_text(text.replace('"mode": "absolute"', '"mode": "absolut"', 1))
    result = typecheck(require_tool, paths, broken)
    assert result.returncode != 0
    assert "absolut" in result.stdout + result.stderr
