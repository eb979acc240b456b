"""Click and ``flask`` CLI commands as units of work: Flask's CLI runner and real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import click
import pytest
from flask import Flask

import ctxtrace
from ctxtrace import _worker

from .._servers import REPO
from .._support import line_of
from ..fixtures import cli_app

CLI = cli_app.__file__


@pytest.fixture(autouse=True)
def keep_role(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Commands run in this process set its role to ``cli``; put it back after each test."""
    monkeypatch.setattr(_worker, "_role", _worker._role)
    yield


@pytest.fixture
def app() -> Flask:
    return cli_app.create_app()


class TestCliRunner:
    """Commands invoked through Flask's CLI runner, in this process."""

    def test_command_without_app_context_is_reported_with_its_name(
        self, app: Flask, instrumented: Any
    ) -> None:
        """A plain click command reading current_app: its line, unit = the command."""
        recorder = instrumented()
        result = app.test_cli_runner().invoke(args=["report-config"])
        assert result.exit_code == 1
        assert isinstance(result.exception, RuntimeError)
        [access] = recorder.accesses()
        assert access.proxy == "current_app"
        assert access.site is not None
        assert (access.site.file, access.site.line) == (CLI, line_of(CLI, "cli-forgot"))
        assert access.unit is not None
        assert (access.unit.kind, access.unit.name) == ("command", "report-config")
        assert recorder.anomalies() == []

    def test_command_under_with_appcontext_is_silent(self, app: Flask, instrumented: Any) -> None:
        """with_appcontext pops its context when the click context closes: still clean."""
        recorder = instrumented()
        result = app.test_cli_runner().invoke(args=["seed-data"])
        assert result.exit_code == 0, result.output
        assert result.output == "seeded cli-shop\n"
        assert recorder.events == []

    def test_runner_does_not_make_this_process_a_cli(self, app: Flask, instrumented: Any) -> None:
        """A command run by the test runner is a unit, but the process keeps its role."""
        instrumented()
        role = _worker.role()
        app.test_cli_runner().invoke(args=["seed-data"])
        assert _worker.role() == role

    @pytest.mark.leaks_on_purpose
    def test_command_that_leaks_is_reported_with_its_name(
        self, app: Flask, instrumented: Any
    ) -> None:
        """A command that pushes and never pops: leaked when the command ends."""
        recorder = instrumented()
        result = app.test_cli_runner().invoke(args=["warm-cache"])
        assert result.exit_code == 0
        [leak] = recorder.anomalies()
        assert leak.name == "leaked"
        assert leak.reason == "unit_end"
        assert leak.unit is not None and leak.unit.name == "warm-cache"
        assert leak.context.site is not None
        assert leak.context.site.line == line_of(CLI, "cli-leak")
        assert not leak.repaired

    def test_repair_pops_what_a_command_leaked(self, app: Flask, instrumented: Any) -> None:
        """With repair on, the leaked context is popped at the command's end."""
        recorder = instrumented(repair=True)
        result = app.test_cli_runner().invoke(args=["warm-cache"])
        assert result.exit_code == 0
        [leak] = recorder.anomalies("leaked")
        assert leak.repaired

    def test_nested_groups_name_the_innermost_command(self, instrumented: Any) -> None:
        """A command in a group in a group: the access names the command that ran."""
        recorder = instrumented()
        outer, inner = click.Group("outer"), click.Group("inner")
        outer.add_command(inner)
        inner.add_command(cli_app.report_config)
        result = click.testing.CliRunner().invoke(outer, ["inner", "report-config"])
        assert isinstance(result.exception, RuntimeError)
        [access] = recorder.accesses()
        assert access.unit is not None and access.unit.name == "report-config"

    @pytest.mark.usefixtures("no_agent")
    def test_uninstrument_restores_command_invoke(self) -> None:
        """click.Command.invoke is the identical function again after uninstrument."""
        original = vars(click.Command)["invoke"]
        assert ctxtrace.instrument(metrics="none")
        assert vars(click.Command)["invoke"] is not original
        assert ctxtrace.uninstrument()
        assert vars(click.Command)["invoke"] is original


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXTRACE_")}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return done, [line for line in lines if line.get("logger_name") == "ctxtrace"]


class TestSubprocess:
    """Real programs: a plain click group, and the ``flask`` command."""

    def test_program_reports_the_command_and_its_role(self) -> None:
        """``python -m ... report-config``: one log line naming the command, role cli."""
        done, logs = _run("-m", "tests.fixtures.cli_app", "report-config")
        assert done.returncode == 1
        assert "Working outside of application context" in done.stderr
        [line] = logs
        assert line["event"] == "ctxtrace.out_of_context_access"
        assert line["unit"] == "command:report-config"
        assert line["site"] == f"{CLI}:{line_of(CLI, 'cli-forgot')}"
        assert line["worker"].endswith(":cli")

    def test_flask_command_with_appcontext_is_silent(self) -> None:
        """``flask --app ... seed-data``: the command runs and ctxtrace says nothing."""
        flask = os.path.join(os.path.dirname(sys.executable), "flask")
        done, logs = _run(
            flask, "--app", "tests.fixtures.cli_app:create_app(trace=True)", "seed-data"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "seeded cli-shop\n"
        assert logs == []

    def test_flask_command_that_leaks_is_reported(self) -> None:
        """``flask --app ... warm-cache``: leaked at the command's end, then the flask
        command's own pop fails under it (the aftermath names the leaked push)."""
        flask = os.path.join(os.path.dirname(sys.executable), "flask")
        done, logs = _run(
            flask, "--app", "tests.fixtures.cli_app:create_app(trace=True)", "warm-cache"
        )
        assert "Popped wrong app context" in done.stderr
        leak_site = f"{CLI}:{line_of(CLI, 'cli-leak')}"
        leak, wrong = logs
        assert leak["event"] == "ctxtrace.leaked"
        assert leak["unit"] == "command:warm-cache"
        assert leak["site"] == leak_site
        assert leak["worker"].endswith(":cli")
        assert wrong["event"] == "ctxtrace.wrong_pop"
        assert wrong["top_site"] == leak_site
