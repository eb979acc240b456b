"""An access whose RuntimeError the application caught is told apart from one that
escaped to its unit's boundary: a request's 500, a thread's end, a command's failure."""

from __future__ import annotations

import asyncio
import code
import concurrent.futures
import contextlib
import gc
import io
import sys
import threading
from collections.abc import Callable
from string import Template
from typing import Any

import click
import flask
import pytest
from click.testing import CliRunner
from flask import Flask, current_app, g, request

from ctxtrace import _agent

from .._support import Recorder, line_of

HERE = __file__
WsgiApp = Callable[[dict[str, Any], Any], Any]


def _told(recorder: Recorder) -> list[tuple[str, str | None]]:
    return [(a.outcome, a.unit.kind if a.unit else None) for a in recorder.accesses()]


def _settled(recorder: Recorder) -> list[tuple[int, str]]:
    """Tell every access made outside any unit now; what was told, as (line, outcome)."""
    agent = _agent.current()
    assert agent is not None
    agent.ledger.settle_loose()
    return sorted((a.site.line if a.site else 0, a.outcome) for a in recorder.accesses())


class ConfigReader:
    """WSGI middleware that reads the app's config before Flask pushes a context (a
    classic fault): ``fallback`` catches the error, else it fails the request."""

    def __init__(self, wsgi_app: WsgiApp, fallback: bool) -> None:
        self.wsgi_app = wsgi_app
        self.fallback = fallback

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        try:
            environ["budget"] = current_app.config.get("BUDGET", 1)
        except RuntimeError as exc:
            if not self.fallback:
                raise
            environ["budget_error"] = exc
        return self.wsgi_app(environ, start_response)


@pytest.mark.parametrize(("fallback", "outcome"), [(True, "handled"), (False, "escaped")])
def test_middleware_fallback_or_failure(instrumented: Any, fallback: bool, outcome: str) -> None:
    """The same access in a request's middleware: caught, or failing the request."""
    recorder: Recorder = instrumented()
    app = Flask("outcomes")
    app.route("/")(lambda: "ok")
    app.wsgi_app = ConfigReader(app.wsgi_app, fallback)  # type: ignore[method-assign]
    client = app.test_client()
    if fallback:
        assert client.get("/").data == b"ok"
    else:
        with pytest.raises(RuntimeError):
            client.get("/")
    assert _told(recorder) == [(outcome, "request")]


def test_an_error_raised_from_a_caught_access_makes_it_escape(instrumented: Any) -> None:
    """A view that fails (a 500) with an error raised from the access's error: escaped,
    through Flask's got_request_exception."""
    recorder: Recorder = instrumented()
    app = Flask("outcomes")

    @app.route("/")
    def view() -> str:
        cause = request.environ.get("budget_error")
        if cause is not None:
            raise LookupError("no budget configured") from cause
        return "ok"

    app.wsgi_app = ConfigReader(app.wsgi_app, fallback=True)  # type: ignore[method-assign]
    assert app.test_client().get("/").status_code == 500
    assert _told(recorder) == [("escaped", "request")]


@pytest.mark.parametrize(("catch", "outcome"), [(True, "handled"), (False, "escaped")])
def test_a_thread_that_catches_or_dies(
    instrumented: Any, catch: bool, outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread's access: caught inside it, or ending the thread with the error."""
    recorder: Recorder = instrumented()
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the dying thread's print

    def job() -> None:
        try:
            g.setdefault("mail", 1)
        except RuntimeError:
            if not catch:
                raise

    worker = threading.Thread(target=job, name="mailer")
    worker.start()
    worker.join()
    assert _told(recorder) == [(outcome, "thread")]


@pytest.mark.parametrize(("catch", "outcome"), [(True, "handled"), (False, "escaped")])
def test_a_command_that_catches_or_fails(instrumented: Any, catch: bool, outcome: str) -> None:
    """A click command's access: a fallback, or the command failing with it."""
    recorder: Recorder = instrumented()

    @click.command("report-config")
    def report_config() -> None:
        try:
            click.echo(current_app.config["DEBUG"])
        except RuntimeError:
            if not catch:
                raise
            click.echo("no app")

    result = CliRunner().invoke(report_config, [])
    assert (result.exit_code == 0) == catch
    assert _told(recorder) == [(outcome, "command")]


def test_the_site_is_the_applications_line_with_the_librarys_beside_it(
    instrumented: Any,
) -> None:
    """A proxy read inside an installed library (here the standard library's
    string.Template): the site is the application's line, the library's is ``via``,
    also when the line is met again (its site cached)."""
    recorder: Recorder = instrumented()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            Template("$user").substitute(g)  # site: through a library
    accesses = recorder.accesses()
    assert len(accesses) == 2
    for access in accesses:
        assert access.site is not None and access.site.via is not None
        assert (access.site.file, access.site.line) == (HERE, line_of(HERE, "through a library"))
        assert access.site.via.file.endswith("string.py")


def test_copy_current_request_context_with_no_request_is_an_access(instrumented: Any) -> None:
    """Applied inside the pool task instead of before submitting it: Flask's error goes to
    the Future as before, and the access is reported at the task's line."""
    recorder: Recorder = instrumented()
    app = Flask("copier")

    def task() -> str:
        # Looked up now, as code that imports it after ctxtrace started finds it.
        return flask.copy_current_request_context(lambda: "sent")()  # site: copier in the task

    with app.test_request_context("/"), concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(task)
        with pytest.raises(RuntimeError, match="copy_current_request_context"):
            future.result(10)
    [access] = recorder.accesses()
    assert access.proxy == "request_ctx"
    assert access.site is not None
    assert (access.site.file, access.site.line) == (HERE, line_of(HERE, "copier in the task"))


def test_a_loop_outside_any_unit_is_told_as_it_goes(instrumented: Any) -> None:
    """A caught access outside any unit is told at the thread's next one, not at the
    sweep: a hot fallback loop holds one error and its frames, not a queue of them."""
    recorder: Recorder = instrumented(log_rate_window=60)
    agent = _agent.current()
    assert agent is not None
    for _ in range(3):
        with contextlib.suppress(RuntimeError):
            current_app.config  # noqa: B018 - the access is the point
    # The first reported in full, the second only counted, the third still held.
    assert [(e.outcome, e.unit) for e in recorder.events] == [("handled", None)]
    assert agent.ledger.repeated_accesses() == [(("current_app", "runtime", "handled"), 1)]
    agent.ledger.settle_loose()
    assert agent.ledger.repeated_accesses() == [(("current_app", "runtime", "handled"), 2)]


def test_an_access_while_the_last_error_is_handled_leaves_that_error_waiting(
    instrumented: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told at the next access, an error still being handled would be judged by where it
    has got to so far: this one is re-raised from its handler and ends the program."""
    recorder: Recorder = instrumented()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the interpreter's traceback
    source = Template(
        "try:\n"
        "    current_app.config  # $first\n"
        "except RuntimeError:\n"
        "    try:\n"
        "        current_app.name\n"
        "    except RuntimeError:\n"
        "        pass\n"
        "    raise\n"
    ).substitute(first="re-raised")
    namespace = {"current_app": current_app}
    code.InteractiveInterpreter(namespace).runcode(compile(source, "<loop>", "exec"))
    assert _settled(recorder) == [
        (2, "escaped"),
        (5, "handled"),
    ]


def test_an_access_error_that_ends_an_asyncio_task_escapes(instrumented: Any) -> None:
    """Outside any unit, an asyncio task that dies of its access: the error reached the
    event loop, as a thread's does its bootstrap. Its traceback alone cannot say so: its
    outermost frame is the coroutine's own, as when the coroutine catches it."""
    recorder: Recorder = instrumented()

    async def dies() -> None:
        current_app.config  # noqa: B018  # site: task dies

    async def run() -> list[BaseException | None]:
        return await asyncio.gather(dies(), return_exceptions=True)

    (error,) = asyncio.run(run())
    assert isinstance(error, RuntimeError)
    assert _settled(recorder) == [
        (line_of(HERE, "task dies"), "escaped"),
    ]


def test_an_asyncio_task_re_raising_after_an_await_escapes(instrumented: Any) -> None:
    """Two tasks of one event loop, outside any unit: the second's access comes while the
    first waits in its ``except`` block, where ``sys.exc_info`` on the loop's thread
    cannot see it. Told at that next access, the first error would be judged handled;
    it is re-raised into the loop after the await."""
    recorder: Recorder = instrumented()

    async def re_raises(turn: asyncio.Event, done: asyncio.Event) -> None:
        try:
            current_app.config  # noqa: B018  # site: task re-raises
        except RuntimeError:
            turn.set()
            await done.wait()
            raise

    async def catches(turn: asyncio.Event, done: asyncio.Event) -> None:
        await turn.wait()
        with contextlib.suppress(RuntimeError):
            current_app.name  # noqa: B018  # site: task catches
        done.set()

    async def both() -> list[BaseException | None]:
        turn, done = asyncio.Event(), asyncio.Event()
        tasks = re_raises(turn, done), catches(turn, done)
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, second = asyncio.run(both())
    assert isinstance(first, RuntimeError) and second is None
    assert _settled(recorder) == [
        (line_of(HERE, "task re-raises"), "escaped"),
        (line_of(HERE, "task catches"), "handled"),
    ]


def test_a_task_that_dies_of_an_access_is_still_reported_by_the_loop(instrumented: Any) -> None:
    """Watching a task's end reads its error without retrieving it: the event loop still
    reports an error that nobody retrieved, as it does without ctxtrace."""
    recorder: Recorder = instrumented()
    reported: list[str] = []

    async def dies() -> None:
        current_app.config  # noqa: B018 - the access is the point

    async def fire_and_forget() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        task = loop.create_task(dies())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()

    asyncio.run(fire_and_forget())
    assert reported == ["Task exception was never retrieved"]
    assert [outcome for _, outcome in _settled(recorder)] == ["escaped"]
