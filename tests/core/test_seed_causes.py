"""Each classic cause of context bugs, reproduced on a real Flask app, is reported at its site."""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g

from ctxtrace import _agent
from ctxtrace.core.flaskshape import detect

from .._support import clear_flask_stacks, line_of, push_count

HERE = __file__
MERGED = detect().merged


def test_background_thread_reading_config(app: Flask, instrumented: Any) -> None:
    """A thread started by a view that reads current_app.config is reported with its site."""
    recorder = instrumented()
    errors: list[RuntimeError] = []

    def send_mail() -> None:
        try:
            current_app.config["SECRET_KEY"]  # site: thread-config
        except RuntimeError as exc:
            errors.append(exc)

    @app.route("/signup")
    def signup() -> str:
        worker = threading.Thread(target=send_mail, name="mailer")
        worker.start()
        worker.join()
        return "ok"

    assert app.test_client().get("/signup").status_code == 200
    assert len(errors) == 1
    [access] = recorder.accesses()
    assert access.proxy == "current_app"
    assert access.phase == "runtime"
    assert access.thread_name == "mailer"
    assert access.site is not None
    assert (access.site.file, access.site.line) == (HERE, line_of(HERE, "thread-config"))
    assert recorder.anomalies() == []


def test_push_whose_pop_is_skipped_by_an_exception(app: Flask, instrumented: Any) -> None:
    """A worker thread that pushes, raises before pop and ends: leaked, with the push line."""
    recorder = instrumented()

    def job() -> None:
        try:
            ctx = app.app_context()
            ctx.push()  # site: skipped-pop
            raise ValueError("boom")
            ctx.pop()  # never reached: the classic bug
        except ValueError:
            pass

    worker = threading.Thread(target=job, name="nightly")
    worker.start()
    worker.join()
    current = _agent.current()
    assert current is not None
    current.sweep()
    [leak] = recorder.anomalies("leaked")
    # The thread is a unit of work of its own when the threading integration is on.
    assert leak.reason in ("unit_end", "thread_end", "collected")
    assert leak.context.thread_name == "nightly"
    assert leak.context.site is not None
    assert leak.context.site.line == line_of(HERE, "skipped-pop")
    assert recorder.names() == ["leaked"]


def test_module_level_current_app_at_import(
    tmp_path: Path, instrumented: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module reading current_app at import time: phase import, the module's own line."""
    recorder = instrumented()
    module = tmp_path / "shop_settings.py"
    module.write_text(
        "from flask import current_app\n\nTIMEOUT = current_app.config['TIMEOUT']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="Working outside of application context"):
        importlib.import_module("shop_settings")
    sys.modules.pop("shop_settings", None)
    [access] = recorder.accesses()
    assert access.phase == "import"
    assert access.site is not None
    assert (access.site.file, access.site.line) == (str(module), 3)


class Mailer:
    """An extension in the init_app style, used by mistake before init_app ran."""

    def init_app(self, app: Flask) -> None:
        app.extensions["mailer"] = self

    def send(self) -> None:
        current_app.extensions["mailer"]  # site: extension-use


def test_extension_used_before_init_app(instrumented: Any) -> None:
    """An extension touched with no app (import time or a script): the extension's line."""
    recorder = instrumented()
    mailer = Mailer()
    with pytest.raises(RuntimeError):
        mailer.send()
    [access] = recorder.accesses()
    assert access.site is not None
    assert access.site.line == line_of(HERE, "extension-use")
    assert access.site.function == "Mailer.send"


def test_pop_in_the_wrong_order(app: Flask, instrumented: Any) -> None:
    """Popping the outer context first names the inner one and its push site as culprit."""
    recorder = instrumented()
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()  # site: inner-push
    with pytest.raises((AssertionError, RuntimeError)):
        outer.pop()
    [wrong] = recorder.anomalies()
    assert wrong.name == "wrong_pop"
    assert wrong.other is not None and wrong.other.site is not None
    assert wrong.other.site.line == line_of(HERE, "inner-push")
    assert [r.op for r in wrong.flight][-3:] == ["push", "push", "pop"]
    # Put the thread back as it was; the rest is the aftermath of one mistake.
    for ctx in (inner, outer):
        while push_count(ctx) > 0:
            try:
                ctx.pop()
            except (AssertionError, RuntimeError, LookupError, IndexError):
                break
    clear_flask_stacks()
    assert recorder.names() == ["wrong_pop"]


def test_context_leaked_inside_a_request(app: Flask, instrumented: Any) -> None:
    """A view that pushes and never pops: one report naming the view's push line."""
    recorder = instrumented()

    @app.route("/report")
    def report() -> str:
        app.app_context().push()  # site: view-leak
        return "ok"

    client = app.test_client()
    with contextlib.suppress(AssertionError, RuntimeError):
        client.get("/report")  # Flask itself refuses to pop the request's context over the leak
    clear_flask_stacks()
    [anomaly] = recorder.anomalies()
    assert anomaly.name == "wrong_pop"
    assert anomaly.other is not None and anomaly.other.site is not None
    assert anomaly.other.site.line == line_of(HERE, "view-leak")


class LeakyAudit:
    """WSGI middleware that pushes an app context for audited paths and forgets the pop."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.wsgi_app = app.wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] == "/leak":
            self.app.app_context().push()  # site: middleware-push
        return self.wsgi_app(environ, start_response)


@pytest.mark.leaks_on_purpose
def test_thread_reused_after_a_leak_sees_stale_g(app: Flask, instrumented: Any) -> None:
    """A leak in one request: leaked at its end, stale_context for the next on that thread."""
    recorder = instrumented()

    @app.route("/leak")
    def leaky_view() -> str:
        g.cart_marker = "from-the-first-request"
        return "ok"

    @app.route("/whoami", endpoint="whoami")
    def whoami_view() -> str:
        return str(g.get("cart_marker", "clean"))

    app.wsgi_app = LeakyAudit(app)  # type: ignore[method-assign]
    client = app.test_client()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gthread") as pool:
        pool.submit(client.get, "/leak").result()
        second = pool.submit(client.get, "/whoami").result()
        pool.submit(clear_flask_stacks).result()
    [leak] = recorder.anomalies("leaked")
    assert leak.reason == "unit_end"
    assert leak.context.site is not None
    assert leak.context.site.line == line_of(HERE, "middleware-push")
    stale = recorder.anomalies("stale_context")
    assert [s.context.id for s in stale] == [leak.context.id]
    assert stale[0].unit is not None and stale[0].unit.name == "whoami"
    expected = "clean" if MERGED else "from-the-first-request"
    assert second.get_data(as_text=True) == expected
