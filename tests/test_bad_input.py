"""Hostile values where ctxtrace reads: the application behaves as without it, logs stay JSON.

Each scenario runs twice, bare and instrumented, and must give the same result
(status and body, or the same exception). Every line ctxtrace writes to stderr
must be one valid JSON object, and no event may carry another request's data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask, current_app, g
from flask.ctx import AppContext

import ctxtrace
from ctxtrace import _agent
from ctxtrace._events import Anomaly, OutOfContextAccess
from ctxtrace.core.names import safe_name

from ._support import add_wrong_pop_route, clear_flask_stacks

NAME_IDS = ["forged", "control", "unicode", "huge", "blank"]
HOSTILE_NAMES = [
    'shop"}\n{"level": "critical", "event": "forged"}',
    "\x00\x1b[31mred\x1b[0m\r\t\x7f\x08",
    "caf\u00e9 \u2603 \u2028\u2029 \ud7ff",
    "n" * 100_000,
    " ",
]


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as JSON; a line that is not one JSON object fails."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line[:200]
        records.append(record)
    return records


# Object ids and addresses in Flask's messages differ from run to run.
_IDS = re.compile(r"\b(?:0x[0-9a-f]+|\d{9,})\b")


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What the application saw: the result, or the exception's type and message."""
    try:
        return "returned", _IDS.sub("<id>", repr(call()))
    except BaseException as exc:
        try:
            message = str(exc)
        except BaseException as str_failed:
            message = f"<str raised {type(str_failed).__name__}>"
        return type(exc).__name__, _IDS.sub("<id>", message)


def _both_ways(
    scenario: Callable[[], Any], instrumented: Any
) -> tuple[tuple[str, str], tuple[str, str], Any]:
    """The scenario's outcome bare, then instrumented; and the recorder."""
    bare = _outcome(scenario)
    clear_flask_stacks()
    recorder = instrumented()
    with_ctxtrace = _outcome(scenario)
    clear_flask_stacks()
    return bare, with_ctxtrace, recorder


def _leaky_app(name: str, root: Path) -> Flask:
    """An app (named ``name``) whose middleware leaks on /leak and whose /wrong pops badly."""
    app = Flask(name, root_path=str(root))

    @app.route("/")
    def index() -> str:
        return "index"

    @app.route("/leak")
    def leak() -> str:
        return "leak"

    add_wrong_pop_route(app)

    inner_wsgi = app.wsgi_app

    def middleware(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/leak":
            app.app_context().push()
        return inner_wsgi(environ, start_response)

    app.wsgi_app = middleware  # type: ignore[method-assign]
    return app


def _in_thread(work: Callable[[], Any], name: str) -> Any:
    """Run ``work`` in a new thread (its own stacks); return what it returned."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(_outcome(work)), name=name)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return box[0]


# -- names, threads and paths ------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=NAME_IDS)
def test_hostile_app_names(
    name: str, tmp_path: Path, instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests answer as bare; every log line is one JSON object; app names are made safe."""

    def scenario() -> list[tuple[int, bytes]]:
        app = _leaky_app(name, tmp_path)
        # Each request on its own thread: the leak dies with it, as on a server.
        return [
            _in_thread(lambda p=path: _status(app, p), "client")
            for path in ("/", "/leak", "/wrong", "/")
        ]

    bare, with_ctxtrace, recorder = _both_ways(scenario, instrumented)
    ctxtrace.uninstrument()
    assert with_ctxtrace == bare
    names = {e.context.app for e in recorder.anomalies()}
    assert {a.name for a in recorder.anomalies()} == {"leaked", "wrong_pop"}
    for app_name in names:
        assert len(app_name) <= 120
        assert not any(ord(c) < 32 or c == "\x7f" for c in app_name)
    lines = _json_lines(capsys.readouterr().err)
    assert {r["event"] for r in lines} >= {"ctxtrace.leaked", "ctxtrace.wrong_pop"}
    assert all(r["app"] in names for r in lines if "app" in r)


def _status(app: Flask, path: str) -> tuple[int, bytes]:
    response = app.test_client().get(path)
    return response.status_code, response.data


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=NAME_IDS)
def test_hostile_thread_names(
    name: str, instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thread with a hostile name leaks and reads a proxy with no context: JSON lines.

    The name arrives made safe, as an app name is (see the next test for the bound).
    """
    app = Flask("threads")

    def work() -> str:
        with contextlib.suppress(RuntimeError):
            current_app.config["X"]
        app.app_context().push()
        return "done"

    bare = _in_thread(work, name)
    recorder = instrumented()
    assert _in_thread(work, name) == bare
    _agent_sweep()
    ctxtrace.uninstrument()
    [leak] = recorder.anomalies("leaked")
    [access] = recorder.accesses()
    assert leak.context.thread_name == access.thread_name == safe_name(name)
    lines = _json_lines(capsys.readouterr().err)
    assert {r["event"] for r in lines} == {"ctxtrace.leaked", "ctxtrace.out_of_context_access"}
    assert all(r["thread"] == safe_name(name) for r in lines)


def test_thread_names_are_bounded_like_app_names(
    instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A huge thread name with control characters is made safe as an app name is."""
    recorder = instrumented()
    app = Flask("threads")
    _in_thread(lambda: app.app_context().push(), "\x1b[2J" + "n" * 100_000)
    _agent_sweep()
    [leak] = recorder.anomalies("leaked")
    assert len(leak.context.thread_name) <= 120
    assert not any(ord(c) < 32 for c in leak.context.thread_name)
    assert all(len(line) < 16_384 for line in capsys.readouterr().err.splitlines())


def _agent_sweep() -> None:
    agent = _agent.current()
    assert agent is not None
    agent.sweep()


@pytest.fixture
def weird_module(tmp_path: Path) -> Iterator[ModuleType]:
    """A module in a folder and file whose names hold newlines and escape codes."""
    folder = tmp_path / "line\nbreak \x1b[1m\u2603"
    folder.mkdir()
    path = folder / "evil\nname \"quoted\".py"
    path.write_text(
        "def leak(app):\n"
        "    app.app_context().push()\n"
        "\n"
        "def read(proxy):\n"
        "    return proxy.name\n"
    )
    spec = importlib.util.spec_from_file_location("ctxtrace_weird_module", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("ctxtrace_weird_module", None)
    yield module


def test_file_paths_with_newlines(
    weird_module: Any, instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sites in a file whose path holds a newline: reported with that path, in JSON."""
    app = Flask("paths")

    def work() -> Any:
        with contextlib.suppress(RuntimeError):
            weird_module.read(current_app)
        weird_module.leak(app)

    bare = _in_thread(work, "paths")
    recorder = instrumented()
    assert _in_thread(work, "paths") == bare
    _agent_sweep()
    ctxtrace.uninstrument()
    [leak] = recorder.anomalies("leaked")
    [access] = recorder.accesses()
    assert leak.context.site is not None and access.site is not None
    assert leak.context.site.file == access.site.file == weird_module.__file__
    assert "\n" in leak.context.site.file
    lines = _json_lines(capsys.readouterr().err)
    assert len(lines) == 2
    assert all(r["site"].startswith(weird_module.__file__) for r in lines)


# -- odd contexts, apps and proxies -------------------------------------------------


class ReprError(Exception):
    pass


class OddContext(AppContext):
    """An app context subclass that fights back: no repr, no equality, no truth, no hash."""

    def __repr__(self) -> str:
        raise ReprError("no repr")

    def __eq__(self, other: object) -> bool:
        raise ReprError("no eq")

    def __bool__(self) -> bool:
        raise ReprError("no bool")

    __hash__ = None  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        raise ReprError(f"no {name}")


def test_context_subclass_that_fights_back(instrumented: Any) -> None:
    """Pushes, a wrong pop and a leak with an odd context class: same outcomes, all seen."""
    app = Flask("odd")

    def scenario() -> list[Any]:
        seen: list[Any] = []
        with OddContext(app):
            seen.append(current_app.name)
        outer, inner = OddContext(app), OddContext(app)
        outer.push()
        inner.push()
        seen.append(_outcome(outer.pop))
        clear_flask_stacks()
        seen.append(_in_thread(lambda: OddContext(app).push(), "odd-leaker"))
        return seen

    bare, with_ctxtrace, recorder = _both_ways(scenario, instrumented)
    _agent_sweep()
    agent = _agent.current()
    assert agent is not None
    errors = agent.errors.counts()
    ctxtrace.uninstrument()
    assert with_ctxtrace == bare
    assert sorted(recorder.names()) == ["leaked", "wrong_pop"]
    assert errors == {}


class NamelessFlask(Flask):
    """An app whose ``name`` raises once it is built (a broken property in a subclass)."""

    broken = False

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.broken:
            raise ReprError("no name")
        return "nameless"


def test_app_whose_name_raises_fails_open_once(
    tmp_path: Path, instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """ctxtrace cannot name the app: requests still answer as bare; one internal error line."""

    def scenario() -> list[tuple[int, bytes]]:
        app = NamelessFlask("nameless", root_path=str(tmp_path))

        @app.route("/")
        def index() -> str:
            g.x = 1
            return "ok"

        app.broken = True
        client = app.test_client()
        return [_status_with(client, "/") for _ in range(5)]

    bare, with_ctxtrace, _ = _both_ways(scenario, instrumented)
    agent = _agent.current()
    assert agent is not None
    errors = agent.errors.counts()
    ctxtrace.uninstrument()
    assert with_ctxtrace == bare
    assert with_ctxtrace[0] == "returned"
    assert errors.get("hooks", 0) >= 5
    lines = _json_lines(capsys.readouterr().err)
    assert [r["event"] for r in lines] == ["ctxtrace.internal_error"]
    assert lines[0]["exc_type"] == "ReprError"


def _status_with(client: Any, path: str) -> tuple[int, bytes]:
    response = client.get(path)
    return response.status_code, response.data


class Unprintable(RuntimeError):
    """A RuntimeError whose message cannot be read."""

    def __str__(self) -> str:
        raise ReprError("no str")


class Abort(BaseException):
    """Not an Exception at all."""


def _context_whose_g_raises(error: BaseException) -> type[AppContext]:
    class Broken(AppContext):
        def _get_g(self) -> Any:
            raise error

        def _set_g(self, value: Any) -> None:
            pass

        g = property(_get_g, _set_g)  # type: ignore[assignment]

    return Broken


@pytest.mark.parametrize(
    "error",
    [Unprintable(), Abort("abort"), ZeroDivisionError("zero"), KeyError("k")],
    ids=["unprintable-runtime-error", "base-exception", "zero-division", "key-error"],
)
def test_proxy_lookup_raising_something_odd(error: BaseException, instrumented: Any) -> None:
    """The very exception object reaches the caller, instrumented or not."""
    app = Flask("odd-proxy")
    seen: list[BaseException] = []

    def scenario() -> None:
        with _context_whose_g_raises(error)(app):
            try:
                g.anything  # noqa: B018 - the lookup is the point
            except BaseException as exc:
                seen.append(exc)
                raise

    bare, with_ctxtrace, recorder = _both_ways(scenario, instrumented)
    ctxtrace.uninstrument()
    assert with_ctxtrace == bare
    assert seen == [error, error]
    assert recorder.accesses() == []


def test_runtime_error_from_a_lookup_with_a_context_is_not_out_of_context(
    instrumented: Any,
) -> None:
    """A context is pushed, its ``g`` fails for its own reasons: not an out-of-context access."""
    recorder = instrumented()
    app = Flask("backend")
    broken = _context_whose_g_raises(RuntimeError("user alice@example.com: backend down"))
    with broken(app), pytest.raises(RuntimeError, match="backend down"):
        g.anything  # noqa: B018 - the lookup is the point
    assert recorder.accesses() == []


# -- one request's data stays in its own events ------------------------------------


def test_each_threads_events_name_only_that_thread(instrumented: Any) -> None:
    """Eight threads, each with its own hostile marker in app and thread name, leak at once."""
    recorder = instrumented()
    markers = [f"M{i}\n\x1b[{i}m" for i in range(8)]
    barrier = threading.Barrier(len(markers), timeout=10)

    def work(marker: str) -> None:
        app = Flask(f"app-{marker}", root_path="/")
        with app.app_context():
            barrier.wait()
            with contextlib.suppress(AttributeError):
                g.missing  # noqa: B018 - an AttributeError, not an anomaly
        app.app_context().push()
        barrier.wait()

    threads = [
        threading.Thread(target=work, args=(m,), name=f"thread-{m}") for m in markers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    _agent_sweep()
    leaks = recorder.anomalies("leaked")
    assert len(leaks) == len(markers)
    for leak in leaks:
        own = leak.context.thread_name.removeprefix("thread-")
        others = [m for m in markers if m != own]
        text = repr(leak)
        assert own.replace("\n", "?").replace("\x1b", "?") in leak.context.app
        assert all(record.thread_name == leak.context.thread_name for record in leak.flight)
        # Markers are unique substrings ("M1\n" is not in "M10"): none of the others shows.
        assert not any(repr(m)[1:-1] in text or m in text for m in others)
    assert all(isinstance(e, Anomaly | OutOfContextAccess) for e in recorder.events)
