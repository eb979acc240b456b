"""Which phase an out-of-context access belongs to: a module's import, or run time."""

from __future__ import annotations

import code
import importlib
import io
import sys
from pathlib import Path
from typing import Any

import pytest

from ctxtrace import _agent

ACCESS = (
    "from flask import current_app\n"
    "try:\n"
    "    current_app.name\n"
    "except RuntimeError:\n"
    "    pass\n"
)


def test_code_exec_in_a_module_namespace_outside_an_import_is_runtime(instrumented: Any) -> None:
    """execnet (pytest-xdist) and embedding hosts exec code in a namespace named otherwise
    than ``__main__``: that is run time, not an import."""
    recorder = instrumented()
    exec(compile(ACCESS, "<channel>", "exec"), {"__name__": "__channelexec__"})
    assert [a.phase for a in recorder.accesses()] == ["runtime"]


def test_a_module_body_run_by_the_import_system_is_import_time(
    instrumented: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same lines as a module's body, imported: import time."""
    (tmp_path / "reads_config_at_import.py").write_text(ACCESS)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorder = instrumented()
    try:
        importlib.import_module("reads_config_at_import")
    finally:
        sys.modules.pop("reads_config_at_import", None)
    assert [a.phase for a in recorder.accesses()] == ["import"]


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        ("try:\n    DEBUG = current_app.config['DEBUG']\nexcept RuntimeError:\n    DEBUG = False\n",
         "handled"),
        ("DEBUG = current_app.config['DEBUG']\n", "escaped"),
    ],
)
def test_an_import_time_access_outside_any_unit_is_told_at_the_sweep(
    instrumented: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, outcome: str
) -> None:
    """No unit watches a module's import: the error was handled if the module's own code
    caught it, escaped if it failed the import (here for an interpreter loop, a framework)."""
    (tmp_path / "settings_at_import.py").write_text("from flask import current_app\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the failed import's traceback
    recorder = instrumented()
    try:
        code.InteractiveInterpreter().runcode(compile("import settings_at_import", "<x>", "exec"))
    finally:
        sys.modules.pop("settings_at_import", None)
    agent = _agent.current()
    assert agent is not None
    assert recorder.events == []  # not told yet: its error may still be on its way up
    agent.ledger.settle_loose()
    assert [(a.phase, a.outcome) for a in recorder.accesses()] == [("import", outcome)]
