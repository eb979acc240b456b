"""``ctxtrace check-imports``: fixture packages with and without import-time context bugs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctxtrace.commands import check_imports

from .._servers import REPO
from .._support import line_of

FIXTURES = Path(__file__).parents[1] / "fixtures"
BUGGY = FIXTURES / "imports_buggy"


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = check_imports.main(["--path", str(FIXTURES), *args])
    out, err = capsys.readouterr()
    return status, out, err


def buggy_site(module: str, marker: str) -> tuple[str, int]:
    path = str(BUGGY / f"{module}.py")
    return path, line_of(path, marker)


@pytest.fixture(scope="module")
def buggy_report() -> dict[str, Any]:
    """The JSON report on the buggy package (one importing process for the module's tests)."""
    report, problem = check_imports._run_child(
        ["imports_buggy"], [str(FIXTURES)], argparse.Namespace(timeout=60.0)
    )
    assert report is not None, problem
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(report)))
    return data


class TestFindings:
    """What the buggy package has, each found once, at its line."""

    def test_class_body_reading_config_is_found(self, buggy_report: dict[str, Any]) -> None:
        """A model whose class body reads current_app.config: module, file:line, proxy."""
        found = {(a["file"], a["line"]): a for a in buggy_report["accesses"]}
        access = found[buggy_site("models", "class-body")]
        assert access["module"] == "imports_buggy.models"
        assert access["proxy"] == "current_app"
        assert access["function"] == "Order"
        assert "Working outside of application context" in access["error"]

    def test_modules_failing_because_of_it_are_listed(self, buggy_report: dict[str, Any]) -> None:
        """The model module and the views importing it fail, both blamed on that line."""
        path, line = buggy_site("models", "class-body")
        where = f"{os.path.relpath(path)}:{line}"
        failed = {f["module"]: f for f in buggy_report["failed_imports"]}
        assert failed["imports_buggy.models"]["caused_by"] == [where]
        assert failed["imports_buggy.views"]["caused_by"] == [where]

    def test_a_caught_access_is_still_found(self, buggy_report: dict[str, Any]) -> None:
        """try/except RuntimeError around the read hides the bug, not the access."""
        found = {(a["file"], a["line"]) for a in buggy_report["accesses"]}
        assert buggy_site("settings", "caught") in found
        assert "imports_buggy.settings" not in {f["module"] for f in buggy_report["failed_imports"]}

    def test_a_context_pushed_at_import_is_found_and_popped(
        self, buggy_report: dict[str, Any]
    ) -> None:
        """boot.py pushes and never pops; the modules after it still import with no context."""
        [left] = buggy_report["left_contexts"]
        assert (left["file"], left["line"]) == buggy_site("boot", "import-push")
        assert left["module"] == "imports_buggy.boot"
        # models comes after boot: it would have imported fine inside boot's context.
        assert "imports_buggy.models" in {f["module"] for f in buggy_report["failed_imports"]}

    def test_other_import_errors_are_not_blamed_on_contexts(
        self, buggy_report: dict[str, Any]
    ) -> None:
        """A missing dependency is listed with no cause, and is the only such failure."""
        other = [f for f in buggy_report["failed_imports"] if not f["caused_by"]]
        assert [f["module"] for f in other] == ["imports_buggy.optional"]
        assert other[0]["error"].startswith("ModuleNotFoundError")

    def test_each_access_is_reported_once(self, buggy_report: dict[str, Any]) -> None:
        """models.py runs again for views' import: still one finding for that line."""
        sites = [(a["file"], a["line"]) for a in buggy_report["accesses"]]
        assert sorted(sites) == sorted(
            [buggy_site("models", "class-body"), buggy_site("settings", "caught")]
        )


class TestCommand:
    """Exit status, output formats and usage errors."""

    def test_clean_package_exits_zero(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No findings: status 0; submodules are imported, __main__ is not."""
        status, out, _ = check(capsys, "--format", "json", "imports_clean")
        assert status == 0
        report = json.loads(out)
        assert report["modules"] == [
            "imports_clean",
            "imports_clean.models",
            "imports_clean.reports",
            "imports_clean.reports.daily",
            "imports_clean.views",
        ]
        assert report["accesses"] == report["failed_imports"] == report["left_contexts"] == []

    def test_buggy_package_exits_one_with_file_line_text(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Text output: one ``file:line: ...`` per finding, a summary last; status 1."""
        status, out, _ = check(capsys, "imports_buggy", "imports_clean")
        assert status == 1
        path, line = buggy_site("models", "class-body")
        lines = out.splitlines()
        assert (
            f"{os.path.relpath(path)}:{line}: current_app used at import time in "
            "imports_buggy.models (Order): RuntimeError: Working outside of application context."
        ) in lines
        assert any(
            x.startswith("imports_buggy.views: failed to import because of the access at")
            for x in lines
        )
        assert lines[-1] == (
            "ctxtrace check-imports: modules imported: 11; import-time accesses: 2;"
            " modules failing because of them: 2; contexts left pushed: 1"
        )

    @pytest.mark.parametrize(
        "args", [["no_such_package_here"], ["not a name"], ["--timeout", "0", "imports_clean"]]
    )
    def test_usage_errors_exit_two(
        self, capsys: pytest.CaptureFixture[str], args: list[str]
    ) -> None:
        """An unknown or malformed package, or a bad option value: status 2 and a message."""
        status, out, err = check(capsys, *args)
        assert (status, out) == (2, "")
        assert err.startswith("ctxtrace check-imports: ")

    def test_missing_arguments_exit_two(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No package at all: argparse's usage error, status 2."""
        with pytest.raises(SystemExit) as exit_info:
            check_imports.main([])
        assert exit_info.value.code == 2

    def test_the_console_script_runs_it(self) -> None:
        """``ctxtrace check-imports`` (the installed console script): status and JSON."""
        script = Path(sys.executable).parent / "ctxtrace"
        done = subprocess.run(
            [str(script), "check-imports", "--format", "json", "--path", str(FIXTURES),
             "imports_buggy"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 1, done.stderr
        assert json.loads(done.stdout)["packages"] == ["imports_buggy"]


def test_pre_commit_hook_manifest() -> None:
    """.pre-commit-hooks.yaml offers the command as a hook that takes packages, not files."""
    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "ctxtrace-check-imports"
    assert hook["entry"] == "ctxtrace check-imports"
    assert hook["pass_filenames"] is False
    assert hook["language"] == "python"
