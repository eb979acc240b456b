"""Which phase an out-of-context access belongs to: a module's import, or run time."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

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
