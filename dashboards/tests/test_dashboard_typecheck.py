"""The dashboard JSON type-checks against Grafana's own published Dashboard type."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path


def test_dashboard_matches_grafana_schema_types(
    require_tool: Callable[[str, str], str], paths: dict[str, Path]
) -> None:
    """typecheck/run.sh (npm ci, then tsc --noEmit) accepts flask-contexts.json.

    The first run downloads @grafana/schema and TypeScript (about 25 MB); later runs
    reuse npm's cache and take a few seconds.
    """
    require_tool("npm", "apt-get install -y nodejs npm (Node.js 18 or newer)")
    require_tool("npx", "apt-get install -y nodejs npm (Node.js 18 or newer)")
    script = paths["dashboards"] / "typecheck" / "run.sh"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dashboard typecheck: ok" in result.stdout
