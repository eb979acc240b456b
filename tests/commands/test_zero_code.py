"""Zero code: ``opentelemetry-instrument`` and ``ctxtrace run`` turn ctxtrace on in a program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxtrace
from ctxtrace import cli
from ctxtrace._autostart import BOOTSTRAP_DIR
from ctxtrace._instrumentor import CtxtraceInstrumentor
from ctxtrace.commands.run import environment
from ctxtrace.telemetry import providers

from .._servers import REPO

BIN = Path(sys.executable).parent
REPORT = [sys.executable, "-m", "flask", "--app", "tests.fixtures.telemetry_app", "report"]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without ctxtrace or OpenTelemetry settings, metrics off."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CTXTRACE_", "OTEL_")) and k != "PYTHONPATH"
    }
    env.update({"CTXTRACE_METRICS": "none", **extra})
    return env


def _run(command: Sequence[str], env: Mapping[str, str]) -> Any:
    done = subprocess.run(
        list(command), cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class TestOpenTelemetryInstrument:
    def test_turns_it_on(self) -> None:
        """The entry point makes opentelemetry-instrument start ctxtrace with its options."""
        command = [str(BIN / "opentelemetry-instrument"), *REPORT]
        state = _run(command, _env(CTXTRACE_SPANS="all"))
        assert state["instrumented"] is True
        assert state["spans"] == "all"

    def test_disabled_by_name(self) -> None:
        """OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ctxtrace leaves it off."""
        command = [str(BIN / "opentelemetry-instrument"), *REPORT]
        env = _env(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="flask,ctxtrace")
        assert _run(command, env)["instrumented"] is False


class TestCtxtraceRun:
    def test_flask_command(self) -> None:
        """ctxtrace run -- flask ...: on, with the options given on the command line."""
        command = [str(BIN / "ctxtrace"), "run", "--set", "spans=all", "--", *REPORT]
        state = _run(command, _env())
        assert state["instrumented"] is True and state["spans"] == "all"

    def test_script_and_its_child_process(self) -> None:
        """python script.py and the Python process it starts are both instrumented."""
        command = [str(BIN / "ctxtrace"), "run", "--", sys.executable, "-m",
                   "tests.fixtures.telemetry_app"]
        state = _run(command, _env())
        assert state["parent"]["instrumented"] is True
        assert state["child"]["instrumented"] is True
        assert state["child"]["pid"] != state["parent"]["pid"]
        assert state["child"]["worker"] != state["parent"]["worker"]

    def test_the_shadowed_sitecustomize_still_runs(self, tmp_path: Path) -> None:
        """A sitecustomize already on the path runs too, before ctxtrace starts."""
        (tmp_path / "sitecustomize.py").write_text(
            "import os\nos.environ['SITECUSTOMIZE_RAN'] = 'yes'\n"
        )
        probe = (
            "import json, os, ctxtrace;"
            "print(json.dumps([os.environ.get('SITECUSTOMIZE_RAN'), ctxtrace.is_instrumented()]))"
        )
        command = [str(BIN / "ctxtrace"), "run", "--", sys.executable, "-c", probe]
        assert _run(command, _env(PYTHONPATH=str(tmp_path))) == ["yes", True]

    def test_usage_errors(self, capsys: pytest.CaptureFixture[str]) -> None:
        """No command, an unknown command, a bad option: a message and a status, no exec."""
        assert cli.main(["run"]) == 2
        assert cli.main(["run", "--", "no-such-command-ctxtrace"]) == 127
        assert cli.main(["run", "--set", "spans=sometimes", "--", "true"]) == 2
        err = capsys.readouterr().err
        assert "no command given" in err
        assert "command not found" in err
        assert "CTXTRACE_SPANS='sometimes'" in err

    def test_environment(self) -> None:
        """The bootstrap folder goes first on PYTHONPATH, once; options become variables."""
        env = environment({"PYTHONPATH": f"/a{os.pathsep}{BOOTSTRAP_DIR}"}, ["spans=all"])
        assert env["PYTHONPATH"] == f"{BOOTSTRAP_DIR}{os.pathsep}/a"
        assert env["CTXTRACE_SPANS"] == "all"

    def test_one_scrape_address_unless_told_otherwise(self) -> None:
        """scrape=host by default; an explicit mode, or a file_sd folder, is kept."""
        assert environment({}, [])["CTXTRACE_PROMETHEUS_SCRAPE"] == "host"
        assert environment({}, ["prometheus_scrape=both"])["CTXTRACE_PROMETHEUS_SCRAPE"] == "both"
        told = environment({"CTXTRACE_PROMETHEUS_SCRAPE": "worker"}, [])
        assert told["CTXTRACE_PROMETHEUS_SCRAPE"] == "worker"
        for folder in (environment({}, ["prometheus_targets_dir=/t"]),
                       environment({"CTXTRACE_PROMETHEUS_TARGETS_DIR": "/t"}, [])):
            assert "CTXTRACE_PROMETHEUS_SCRAPE" not in folder


class TestInstrumentor:
    def test_declares_flask_and_is_an_entry_point(self) -> None:
        """The class the entry point names, supporting the Flask versions ctxtrace does."""
        (entry,) = entry_points(group="opentelemetry_instrumentor", name="ctxtrace")
        assert entry.load() is CtxtraceInstrumentor
        assert tuple(CtxtraceInstrumentor().instrumentation_dependencies()) == ("flask >= 2.3",)

    def test_providers_and_options_passed_in(self, app: Flask) -> None:
        """instrument(tracer_provider=..., spans=...) as for any OpenTelemetry instrumentor."""
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        instrumentor = CtxtraceInstrumentor()
        instrumentor.instrument(tracer_provider=provider, metrics="none", spans="all")
        try:
            assert ctxtrace.is_instrumented()
            with app.app_context():
                pass
            assert [s.name for s in exporter.get_finished_spans()] == ["flask.app_context"]
        finally:
            instrumentor.uninstrument()
        assert not ctxtrace.is_instrumented()
        assert providers.global_tracer_provider() is not provider
