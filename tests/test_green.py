"""gevent patching a forked child after ctxtrace re-initialised there (``ctxtrace/_green.py``).

Each case runs ``tests/fixtures/gevent_fork.py`` in a process of its own: ctxtrace
on, gevent imported and not patched, a fork, and the child's findings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from ._servers import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None, reason="gevent is not installed"
)


def fork_probe(mode: str) -> tuple[dict[str, Any], str]:
    """The child's findings and the whole run's stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fixtures" / "gevent_fork.py"), mode],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, result
    return result["child"], done.stderr


@pytest.mark.parametrize(
    ("mode", "started", "green", "watchdog"),
    [
        # Patched after the fork (gunicorn's gevent worker): ctxtrace's threads start only
        # then, as greenlets, over gevent's per-greenlet state.
        ("patch", "after_patch", True, "green_watchdog"),
        # gevent imported but never patching (a threaded server): the first push starts
        # the threads, real ones, over real per-thread state.
        ("never", "after_push", False, "watchdog_alive"),
    ],
)
def test_a_forked_child_starts_its_threads_once_it_knows_what_they_are(
    mode: str, started: str, green: bool, watchdog: str
) -> None:
    """Nothing starts before gevent patched or the first push; none dies with a traceback."""
    child, stderr = fork_probe(mode)
    assert child["before"] == []
    assert child[started] == ["ctxtrace-metrics", "ctxtrace-watchdog"]
    assert child["green_local"] is green
    assert child[watchdog] is True
    assert child["internal_errors"] == {}
    assert "Traceback" not in stderr


# -- eventlet: a documented refusal -------------------------------------------------

needs_eventlet = pytest.mark.skipif(
    importlib.util.find_spec("eventlet") is None, reason="eventlet is not installed"
)
#: After eventlet (and ctxtrace) ran, in a fresh process: is ctxtrace on, are Flask's
#: context classes still wrapped, and does a context still work.
AFTERWARDS = (
    "import flask, flask.ctx\n"
    "print(ctxtrace.is_instrumented(), hasattr(flask.ctx.AppContext.push, '__wrapped__'))\n"
    "with flask.Flask('after').app_context():\n"
    "    print(flask.current_app.name)\n"
)


def run_script(script: str) -> tuple[list[str], list[dict[str, Any]], str]:
    """``python -c script``: its stdout lines, ctxtrace's JSON log lines, and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return done.stdout.split(), lines, done.stderr


@needs_eventlet
def test_eventlet_patched_first_keeps_ctxtrace_off() -> None:
    """eventlet patched the process before instrument(): ctxtrace stays off and says so."""
    stdout, lines, _ = run_script(
        "import eventlet\neventlet.monkey_patch()\n"
        "import ctxtrace\nassert not ctxtrace.instrument()\n" + AFTERWARDS
    )
    assert stdout == ["False", "False", "after"]
    assert [(line["event"], line["level"], line["library"]) for line in lines] == [
        ("ctxtrace.unsupported", "error", "eventlet")
    ]


@needs_eventlet
@pytest.mark.parametrize("patch", ["eventlet.monkey_patch()", "eventlet.patcher.monkey_patch()"])
def test_eventlet_patching_after_ctxtrace_turns_it_off_first(patch: str) -> None:
    """ctxtrace on first (``ctxtrace run``, a master that forks): it turns itself off just
    before eventlet patches, its threads end cleanly, and the application runs on.

    (eventlet itself prints tracebacks here when Flask was imported before its patch:
    it walks every object, Flask's proxies among them. Not ctxtrace's threads.)"""
    stdout, lines, stderr = run_script(
        "import ctxtrace\nassert ctxtrace.instrument(metrics='none')\n"
        f"import eventlet, eventlet.patcher\n{patch}\n" + AFTERWARDS
    )
    assert stdout == ["False", "False", "after"]
    assert [(line["event"], line["level"], line["library"]) for line in lines] == [
        ("ctxtrace.unsupported", "error", "eventlet")
    ]
    assert "_delete" not in stderr and "ctxtrace-" not in stderr


@needs_eventlet
def test_eventlet_patching_only_sockets_leaves_ctxtrace_on() -> None:
    """``monkey_patch(socket=True)`` leaves threads alone, and ctxtrace on."""
    stdout, lines, _ = run_script(
        "import ctxtrace\nassert ctxtrace.instrument(metrics='none')\n"
        "import eventlet\neventlet.monkey_patch(socket=True)\n" + AFTERWARDS
        + "ctxtrace.uninstrument()\n"
    )
    assert stdout == ["True", "True", "after"]
    assert lines == []
