"""ctxtrace's frames are hidden from tracebacks the tools render (issue 16, item 8).

pytest honours ``__tracebackhide__`` and the Werkzeug debugger
``__traceback_hide__``: with both set in every wrapper, the tracebacks these
tools show for a view's exception, a teardown's, a click command's and a
thread's are frame for frame those of bare Flask.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from _pytest._code import ExceptionInfo
from click.testing import CliRunner
from flask import Flask
from werkzeug.debug.tbtools import DebugTraceback

import ctxtrace


class Boom(Exception):
    pass


def _view_error() -> BaseException:
    app = Flask("shop")
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.route("/boom")
    def boom() -> str:
        raise Boom("view")

    try:
        app.test_client().get("/boom")
    except Boom as exc:
        return exc
    raise AssertionError("no exception")


def _teardown_error() -> BaseException:
    app = Flask("shop")

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        raise Boom("teardown")

    ctx = app.app_context()
    ctx.push()
    try:
        ctx.pop()
    except Boom as exc:
        return exc
    raise AssertionError("no exception")


def _command_error() -> BaseException:
    @click.command()
    def fails() -> None:
        raise Boom("command")

    result = CliRunner().invoke(fails, [], prog_name="other")
    assert result.exc_info is not None
    return result.exc_info[1]


def _thread_error() -> BaseException:
    caught: list[BaseException] = []
    previous = threading.excepthook

    def keep(args: Any) -> None:
        if args.exc_value is not None:
            caught.append(args.exc_value)

    def work() -> None:
        raise Boom("thread")

    threading.excepthook = keep
    try:
        thread = threading.Thread(target=work, name="doomed")
        thread.start()
        thread.join(10)
    finally:
        threading.excepthook = previous
    return caught[0]


CASES: dict[str, Callable[[], BaseException]] = {
    "view": _view_error,
    "teardown": _teardown_error,
    "command": _command_error,
    "thread": _thread_error,
}


def _pytest_frames(exc: BaseException) -> list[tuple[str, str]]:
    """The frames pytest shows for ``exc`` (after its ``__tracebackhide__`` filter)."""
    info = ExceptionInfo.from_exception(exc)
    return [(Path(str(e.path)).name, e.name) for e in info.traceback.filter(info)]


def _werkzeug_frames(exc: BaseException) -> list[tuple[str, str]]:
    """The frames the Werkzeug debugger shows for ``exc``."""
    text = DebugTraceback(exc).render_traceback_text()
    found = re.findall(r'File "([^"]+)", line \d+, in (\S+)', text)
    return [(Path(file).name, name) for file, name in found]


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_tracebacks_match_bare_flask(case: str, no_agent: None) -> None:
    """pytest's and Werkzeug's rendering: the same frames with ctxtrace on as without."""
    bare = CASES[case]()
    bare_frames = (_pytest_frames(bare), _werkzeug_frames(bare))
    assert ctxtrace.instrument(metrics="none")
    try:
        seen = CASES[case]()
    finally:
        ctxtrace.uninstrument()
    frames = (_pytest_frames(seen), _werkzeug_frames(seen))
    assert frames == bare_frames
    # Positive control: the wrappers are really there, only hidden.
    raw = []
    tb = seen.__traceback__
    while tb is not None:
        raw.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert any("ctxtrace" in Path(f).parts for f in raw), raw
