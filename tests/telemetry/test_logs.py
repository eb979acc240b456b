"""Anomaly log lines: names, levels, fields, rate limiting, and the host's structlog."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from flask import Flask, current_app, g, session

import ctxtrace
from ctxtrace import _agent
from ctxtrace.telemetry.logs import RateLimiter

from .._support import clear_flask_stacks


@pytest.fixture
def host_structlog() -> Iterator[list[dict[str, Any]]]:
    """The host app configured structlog: ctxtrace must use its processors."""
    captured: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: Any) -> Any:
        captured.append(dict(event_dict, level=method))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    yield captured
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_anomaly_line_names_level_and_fields(
    app: Flask, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong pop is one ERROR line ``ctxtrace.wrong_pop`` with the contract fields."""
    assert ctxtrace.instrument(metrics="none")
    outer, inner = app.app_context(), app.app_context()
    outer.push()
    inner.push()
    with pytest.raises((AssertionError, RuntimeError)):
        outer.pop()
    ctxtrace.uninstrument()
    clear_flask_stacks()
    [line] = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert line["event"] == "ctxtrace.wrong_pop"
    assert line["level"] == "error"
    for key in (
        "anomaly",
        "context_id",
        "kind",
        "app",
        "site",
        "function",
        "thread",
        "depth",
        "push_count",
        "age_s",
        "flight",
        "pid",
        "worker",
        "top_context_id",
        "top_site",
    ):
        assert key in line, key
    assert line["site"].endswith(f"test_logs.py:{line['site'].rsplit(':', 1)[1]}")


def test_out_of_context_access_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An access whose error fails its unit is a WARNING with proxy, phase, outcome and site."""
    assert ctxtrace.instrument(metrics="none")
    agent = _agent.current()
    assert agent is not None
    handle = agent.begin_unit("task", "nightly")
    with pytest.raises(RuntimeError):
        try:
            current_app.config  # noqa: B018
        except RuntimeError as exc:
            agent.escaped(exc)  # as an integration does when the task fails with it
            raise
    agent.end_unit(handle)
    ctxtrace.uninstrument()
    [line] = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert (line["event"], line["level"]) == ("ctxtrace.out_of_context_access", "warning")
    assert (line["proxy"], line["phase"], line["outcome"]) == ("current_app", "runtime", "escaped")
    assert "test_logs.py" in line["site"]


def test_a_handled_access_is_an_info_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An access the application caught (a fallback) is logged at INFO, told when its unit
    ends."""
    assert ctxtrace.instrument(metrics="none")
    agent = _agent.current()
    assert agent is not None
    handle = agent.begin_unit("task", "nightly")
    with contextlib.suppress(RuntimeError):
        current_app.config  # noqa: B018
    assert "ctxtrace.out_of_context_access" not in capsys.readouterr().err
    agent.end_unit(handle)
    ctxtrace.uninstrument()
    [line] = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert (line["level"], line["outcome"], line["unit"]) == ("info", "handled", "task:nightly")


def test_handled_and_escaped_accesses_are_rate_limited_apart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Caught accesses at a site do not hold back an escaped one there; each outcome's
    summary counts its own."""
    assert ctxtrace.instrument(metrics="none")
    agent = _agent.current()
    assert agent is not None

    def access(escape: bool) -> None:
        handle = agent.begin_unit("task", "nightly")
        try:
            current_app.config  # noqa: B018 - site: the same line every time
        except RuntimeError as exc:
            if escape:
                agent.escaped(exc)
        agent.end_unit(handle)

    for escape in (False, False, False, True, True, False):
        access(escape)
    ctxtrace.uninstrument()
    lines = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert len({line["site"] for line in lines}) == 1
    assert sorted(
        (x["outcome"], x["level"], x.get("suppressed_since_last", 0), x.get("summary", False))
        for x in lines
    ) == [
        ("escaped", "warning", 0, False),
        ("escaped", "warning", 1, True),
        ("handled", "info", 0, False),
        ("handled", "info", 3, True),
    ]


def test_the_next_window_says_how_many_repeats_were_only_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Repeats inside a window are counted without a line; the site's first line of the
    next window says how many there were."""
    assert ctxtrace.instrument(metrics="none", log_rate_window=0.3)
    agent = _agent.current()
    assert agent is not None

    def access() -> None:
        handle = agent.begin_unit("task", "nightly")
        with contextlib.suppress(RuntimeError):
            current_app.config  # noqa: B018 - site: the same line every time
        agent.end_unit(handle)

    for _ in range(5):
        access()
    time.sleep(0.4)
    access()
    ctxtrace.uninstrument()
    lines = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert [x.get("suppressed_since_last", 0) for x in lines] == [0, 4]


def test_rate_limit_first_then_summary() -> None:
    """The first line of a site passes, repeats are dropped and counted in the next line."""
    now = [0.0]
    limiter = RateLimiter(10.0, clock=lambda: now[0])
    key = ("leaked", "a.py:1")
    assert limiter.admit(key) == 0
    assert limiter.admit(key) is None
    assert limiter.admit(key) is None
    now[0] = 11.0
    assert limiter.admit(key) == 2
    assert limiter.admit(("leaked", "b.py:2")) == 0


def test_flood_is_bounded(app: Flask, capsys: pytest.CaptureFixture[str]) -> None:
    """An access on every call from one site logs once per window, not once per call; what
    the window held back is one summary line when ctxtrace stops."""
    assert ctxtrace.instrument(metrics="none")
    for _ in range(50):
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018
    ctxtrace.uninstrument()
    lines = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert len(lines) == 2
    first, summary = lines
    assert "suppressed_since_last" not in first and "summary" not in first
    assert summary["event"] == "ctxtrace.out_of_context_access"
    assert (summary["suppressed_since_last"], summary["summary"]) == (49, True)
    assert summary["site"] == first["site"]


def test_limiter_drains_what_each_window_held_back() -> None:
    """drain() hands back each key's count and last event once; a new line starts from zero."""
    now = [0.0]
    limiter = RateLimiter(10.0, clock=lambda: now[0])
    key, other = ("leaked", "a.py:1"), ("leaked", "b.py:2")
    assert limiter.admit(key, "first") == 0
    assert limiter.admit(key, "second") is None
    assert limiter.admit(key, "third") is None
    assert limiter.admit(other, "only") == 0
    assert limiter.drain() == [(key, 2, "third")]
    assert limiter.drain() == []
    assert limiter.admit(key, "fourth") is None
    now[0] = 11.0
    assert limiter.admit(key, "fifth") == 1  # the drained two are not counted again


def test_limiter_drains_only_the_windows_that_have_passed() -> None:
    """drain_due() sums up a window once it has passed, and starts a new one."""
    now = [0.0]
    limiter = RateLimiter(10.0, clock=lambda: now[0])
    old, recent = ("leaked", "a.py:1"), ("leaked", "b.py:2")
    limiter.admit(old, "o1")
    limiter.admit(old, "o2")
    now[0] = 5.0
    limiter.admit(recent, "r1")
    limiter.admit(recent, "r2")
    now[0] = 10.0
    assert limiter.drain_due() == [(old, 1, "o2")]
    assert limiter.drain_due() == []
    assert limiter.admit(old, "o3") is None  # inside the window that began at 10
    now[0] = 15.0
    assert limiter.drain_due() == [(recent, 1, "r2")]
    assert limiter.drain() == [(old, 1, "o3")]


def test_the_watchdog_writes_a_passed_windows_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """A window that passed with nothing after it is summed up at the next sweep."""
    assert ctxtrace.instrument(metrics="none", log_rate_window=0.05, sweep_interval=3600)
    agent = _agent.current()
    assert agent is not None
    for _ in range(4):
        handle = agent.begin_unit("task", "nightly")
        with contextlib.suppress(RuntimeError):
            current_app.name  # noqa: B018
        agent.end_unit(handle)  # tells the access (caught: handled)
    time.sleep(0.1)  # the window passes with nothing after it
    agent.sweep()
    lines = [x for x in _json_lines(capsys.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert [(x.get("suppressed_since_last"), x.get("summary")) for x in lines] == [
        (None, None),
        (3, True),
    ]
    ctxtrace.uninstrument()
    assert [x for x in _json_lines(capsys.readouterr().err) if "summary" in x] == []


def test_the_last_window_is_written_out_when_the_process_exits(tmp_path: Any) -> None:
    """A process that exits inside a window (atexit) still writes what it held back."""
    script = tmp_path / "flood.py"
    script.write_text(
        "from flask import current_app\n"
        "import ctxtrace\n"
        "assert ctxtrace.instrument(metrics='none')\n"
        "for _ in range(30):\n"
        "    try:\n"
        "        current_app.name\n"
        "    except RuntimeError:\n"
        "        pass\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
        check=True,
    )
    lines = [x for x in _json_lines(result.stderr) if x["event"].startswith("ctxtrace.")]
    assert [(x["event"], x.get("suppressed_since_last"), x.get("summary")) for x in lines] == [
        ("ctxtrace.out_of_context_access", None, None),
        ("ctxtrace.out_of_context_access", 29, True),
    ]


def _in_a_forked_child(*, access: bool) -> int:
    """Fork; the child (an access of its own first, if asked) tells what waits, writes
    its log lines and exits without atexit, as a forked worker that is killed would."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            agent = _agent.current()
            assert agent is not None
            if access:
                with contextlib.suppress(RuntimeError):
                    current_app.name  # noqa: B018
            agent.ledger.settle_now()  # a caught access is told once its outcome is known
            agent.logs.flush()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def test_a_forked_child_does_not_write_out_its_parents_window(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """After fork the child starts its own windows: the parent's held-back count is the
    parent's to write, once."""
    assert ctxtrace.instrument(metrics="none")
    for _ in range(5):
        with pytest.raises(RuntimeError):
            current_app.name  # noqa: B018
    parent = _agent.current()
    assert parent is not None
    parent.ledger.settle_now()  # told in the parent (caught, so handled), before the fork
    pid = _in_a_forked_child(access=True)
    ctxtrace.uninstrument()
    lines = [x for x in _json_lines(capfd.readouterr().err) if x["event"].startswith("ctxtrace.")]
    counts = sorted((x["pid"], x.get("suppressed_since_last", 0)) for x in lines)
    # Parent: the first line, then 4 held back; child: its own first line, nothing held.
    assert counts == sorted([(os.getpid(), 0), (os.getpid(), 4), (pid, 0)])


def test_host_structlog_processors_are_used(host_structlog: list[dict[str, Any]]) -> None:
    """When the app configured structlog, ctxtrace logs through it and never reconfigures it."""
    config_before = structlog.get_config()
    assert ctxtrace.instrument(metrics="none")
    with pytest.raises(RuntimeError):
        current_app.name  # noqa: B018
    ctxtrace.uninstrument()
    assert any(e["event"] == "ctxtrace.out_of_context_access" for e in host_structlog)
    assert structlog.get_config()["processors"] == config_before["processors"]


def test_no_request_data_in_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """Markers in headers, cookies, query, session and g never reach a log line."""
    app = Flask("secrets")
    app.secret_key = "k"
    marker = "SECRET-MARKER-7f3a"

    @app.route("/leak")
    def leak() -> str:
        g.token = marker
        session["user"] = marker
        app.app_context().push()
        return "ok"

    assert ctxtrace.instrument(metrics="none")
    client = app.test_client()
    client.set_cookie("sid", marker)
    with contextlib.suppress(AssertionError, RuntimeError):
        client.get(f"/leak?q={marker}", headers={"X-Api-Key": marker})

    def background() -> None:
        with contextlib.suppress(RuntimeError):
            session.get("user")

    worker = threading.Thread(target=background)
    worker.start()
    worker.join()
    ctxtrace.uninstrument()
    clear_flask_stacks()
    err = capsys.readouterr().err
    assert "ctxtrace.wrong_pop" in err
    assert "ctxtrace.out_of_context_access" in err
    assert marker not in err


def test_a_forked_child_does_not_tell_its_parents_pending_accesses(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """An access outside any unit waits for its outcome; a child forked meanwhile (a
    preloading gunicorn master's worker) leaves it to the parent, which tells it once."""
    assert ctxtrace.instrument(metrics="none")
    with contextlib.suppress(RuntimeError):
        current_app.name  # noqa: B018 - caught, outside any unit: told later
    _in_a_forked_child(access=False)
    ctxtrace.uninstrument()
    lines = [x for x in _json_lines(capfd.readouterr().err) if x["event"].startswith("ctxtrace.")]
    assert [(x["pid"], x["event"], x["outcome"]) for x in lines] == [
        (os.getpid(), "ctxtrace.out_of_context_access", "handled")
    ]
