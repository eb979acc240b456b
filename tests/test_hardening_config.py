"""Configuration that parses but cannot work, or hides other mistakes (issue 16, items 5 and 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import ctxtrace
from ctxtrace import Config, ConfigError, CtxTrace


def _lines(captured: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in captured.splitlines() if x.startswith("{")]


def test_an_unknown_key_is_shown_bounded() -> None:
    """A 3,000-character unknown key gives a short message, escaped."""
    key = "CTXTRACE_" + "X" * 3000 + "\x1b[31m"
    with pytest.raises(ConfigError) as info:
        Config.resolve({}, {}, {key: "1"})
    # The list of known keys is most of the message; the unknown one is cut short.
    assert "X" * 100 not in str(info.value) and len(str(info.value)) < 1000
    assert "\x1b" not in str(info.value) and len(info.value.key) <= 80


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("CTXTRACE_LEDGER_CAP", "1_000"),
        ("CTXTRACE_LEDGER_CAP", "\u0661\u0660\u0660"),  # Arabic-Indic 100
        ("CTXTRACE_LEDGER_CAP", "\uff11\uff10\uff10"),  # full-width 100
        ("CTXTRACE_FLIGHT_RECORD", "\u0668"),
        ("CTXTRACE_LONG_LIVED_REQUEST", "1_0"),
        ("CTXTRACE_LONG_LIVED_REQUEST", "\uff13"),
        ("CTXTRACE_LONG_LIVED_REQUEST", "infinity"),
        ("CTXTRACE_PROMETHEUS_PORT", "\uff19\uff10\uff10\uff10"),
        ("CTXTRACE_SUPPRESS", "app/views.py:\u0661\u0662"),
    ],
)
def test_numbers_are_ascii_digits_only(key: str, raw: str) -> None:
    """Underscores and non-ASCII digits are refused, naming the key."""
    with pytest.raises(ConfigError) as info:
        Config.resolve({}, {}, {key: raw})
    assert info.value.key == key


@pytest.mark.parametrize("raw", ["1e-9", "0.000001", "0.005"])
def test_the_sweep_interval_has_a_floor(raw: str) -> None:
    """An interval that would spin the watchdog is refused."""
    with pytest.raises(ConfigError, match=r"seconds >= 0\.01"):
        Config.resolve({}, {}, {"CTXTRACE_SWEEP_INTERVAL": raw})
    assert Config.resolve({}, {}, {"CTXTRACE_SWEEP_INTERVAL": "0.01"}).sweep_interval == 0.01


@pytest.mark.parametrize("host", ["", " ", "h\u00e9\u00e9", "a" * 255, "-bad", "a..b", "a b"])
def test_a_host_that_cannot_be_bound_is_refused(host: str) -> None:
    """Empty, blank, non-ASCII or overlong hosts fail at start, naming the variable."""
    with pytest.raises(ConfigError) as info:
        Config.resolve({}, {}, {"CTXTRACE_PROMETHEUS_HOST": host})
    assert info.value.key == "CTXTRACE_PROMETHEUS_HOST"
    assert "host name" in info.value.allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "localhost", "web-1.internal."])
def test_good_hosts_still_parse(host: str) -> None:
    assert Config.resolve({}, {}, {"CTXTRACE_PROMETHEUS_HOST": host}).prometheus_host == host


def test_tilde_means_the_home_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``~/x`` is the home folder's x, never a folder literally named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = Config.resolve({}, {}, {"CTXTRACE_PROMETHEUS_TARGETS_DIR": "~/targets"})
    assert config.prometheus_targets_dir == str(tmp_path / "targets")
    with pytest.raises(ConfigError):
        Config.resolve({}, {}, {"CTXTRACE_PROMETHEUS_TARGETS_DIR": "~no-such-user-ctx/x"})


@pytest.mark.parametrize("folder", ["/etc/passwd", "/proc/nope"])
def test_a_targets_folder_that_cannot_work_is_one_config_error_line(
    folder: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_agent: None,
) -> None:
    """From the environment: one config_error line naming variable, value and what is allowed."""
    monkeypatch.setenv("CTXTRACE_PROMETHEUS_TARGETS_DIR", folder)
    monkeypatch.setenv("CTXTRACE_METRICS", "prometheus")
    monkeypatch.setenv("CTXTRACE_PROMETHEUS_PORT", "0")
    assert not ctxtrace.instrument()
    [line] = [x for x in _lines(capsys.readouterr().err) if x["event"] == "ctxtrace.config_error"]
    assert line["key"] == "CTXTRACE_PROMETHEUS_TARGETS_DIR"
    assert folder in line["value"] and "directory" in line["allowed"]
    assert not ctxtrace.is_instrumented()


def test_a_non_string_app_config_key_is_ignored(no_agent: None) -> None:
    """Flask's config is a dict: keys that are not strings are not ctxtrace's business."""
    app = Flask("odd")
    app.config[42] = "x"  # type: ignore[index]
    app.config[("a", "b")] = "y"  # type: ignore[index]
    extension = CtxTrace(app, metrics="none")
    assert extension.agent is not None


def test_a_bad_environment_does_not_hide_a_bad_app_config_value(
    monkeypatch: pytest.MonkeyPatch, no_agent: None
) -> None:
    """The app.config mistake raises, whatever the environment holds."""
    monkeypatch.setenv("CTXTRACE_DETECT_LEAKED", "maybe")  # bad, and checked first
    monkeypatch.setenv("CTXTRACE_NO_SUCH_KEY", "1")
    app = Flask("bad")
    app.config["CTXTRACE_SPANS"] = "some"
    with pytest.raises(ConfigError) as info:
        CtxTrace(app, metrics="none")
    assert (info.value.key, info.value.source) == ("CTXTRACE_SPANS", "app.config")
    assert not ctxtrace.is_instrumented()


def test_a_bad_environment_variable_is_logged_once_per_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_agent: None
) -> None:
    """Ten instrument() calls, one line."""
    monkeypatch.setenv("CTXTRACE_SWEEP_INTERVAL", f"never-{os.getpid()}-{id(capsys)}")
    for _ in range(10):
        assert not ctxtrace.instrument()
    lines = [x for x in _lines(capsys.readouterr().err) if x["event"] == "ctxtrace.config_error"]
    assert len(lines) == 1


def test_a_host_that_does_not_resolve_is_a_config_error(no_agent: None) -> None:
    """Well formed but unknown here: refused at start, naming the variable."""
    with pytest.raises(ConfigError) as info:
        ctxtrace.instrument(metrics="prometheus", prometheus_host="no-such-host.invalid")
    assert info.value.key == "CTXTRACE_PROMETHEUS_HOST"
    assert "resolves" in info.value.allowed
    assert not ctxtrace.is_instrumented()
