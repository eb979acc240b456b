"""The package's layering holds: import-linter's contracts, and no import cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from ._servers import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
#: The one deliberate cycle: the SDK's providers are imported lazily by their builders.
LAZY_CYCLES = {("ctxtrace.telemetry.providers", "ctxtrace.telemetry.sdk_providers")}


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(pythonpath)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_contracts_hold() -> None:
    """Every contract in pyproject.toml is kept by the package as it is."""
    result = _lint(REPO, REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_a_core_module_importing_telemetry_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts have teeth: a copy whose ledger imports the log emitter fails them."""
    shutil.copytree(REPO / "ctxtrace", tmp_path / "ctxtrace")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    ledger = tmp_path / "ctxtrace" / "core" / "ledger.py"
    ledger.write_text(
        ledger.read_text() + "\nfrom ctxtrace.telemetry import logs  # noqa: E402\n"
    )
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "ctxtrace.core.ledger -> ctxtrace.telemetry.logs" in result.stdout


def test_no_import_cycle_but_the_lazy_one() -> None:
    """No two modules import each other, directly or through others, but the lazy pair."""
    graph = grimp.build_graph("ctxtrace")
    cycles = {
        tuple(sorted((module, imported)))
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.find_shortest_chain(importer=imported, imported=module)
    }
    assert cycles == LAZY_CYCLES
