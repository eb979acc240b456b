"""Tests for ctxtrace.example: the shop serves its healthy endpoints and each seeded fault
behaves as documented, on the installed Flask (2.3 to 3.1, or the next release).

Real Flask throughout (test client, CLI runner, a werkzeug server on loopback); ctxtrace's agent
is not involved.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask.globals
import pytest
from click.testing import CliRunner
from flask import Flask
from flask.cli import FlaskGroup, ScriptInfo
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from ctxtrace.example import APP_NAME, SCENARIOS, create_app
from ctxtrace.example.cli import admin
from ctxtrace.example.extension import audit, inventory
from ctxtrace.example.faults import LEAKED_MARKER
from ctxtrace.example.scenarios import ANOMALY_NAMES
from ctxtrace.example.worker import load_lazy_settings, run_in_thread

# The shop's background jobs end their thread with the error when they fail, as an
# unhandled error does; pytest reports each such thread as a warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO_ROOT / "ctxtrace" / "example"
NO_APP_CONTEXT = "Working outside of application context"


def _flask_version() -> tuple[int, int]:
    major, minor = re.findall(r"\d+", importlib.metadata.version("flask"))[:2]
    return int(major), int(minor)


FLASK_VERSION = _flask_version()
# Up to 3.1 a request reuses an app context that is already pushed, and a bad pop raises
# AssertionError after resetting the context variable; 3.2 changed both.
FLASK_BEFORE_3_2 = FLASK_VERSION < (3, 2)


def pop_leftover_contexts() -> int:
    """Pop every app context still active in this thread; return how many there were."""
    popped = 0
    while (ctx := flask.globals._cv_app.get(None)) is not None:
        ctx.pop()
        popped += 1
        assert popped < 10, "context stack does not shrink"
    return popped


@pytest.fixture(autouse=True)
def _no_context_left_behind() -> Iterator[None]:
    """Like Flask's own suite: a test must not leave a context pushed for the next one.

    Tests that leak on purpose pop their leftovers with pop_leftover_contexts() and assert how
    many there were; anything else left here is cleaned up and then fails the test.
    """
    yield
    leftover = pop_leftover_contexts()
    cv_request = getattr(flask.globals, "_cv_request", None)  # Flask up to 3.1 only
    request_left = cv_request is not None and cv_request.get(None) is not None
    assert (leftover, request_left) == (0, False), "test left a Flask context pushed"


@pytest.fixture
def app() -> Flask:
    return create_app({"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _json(client: FlaskClient, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


# -- healthy endpoints ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/items", "/items/1", "/stream", "/ok/thread-config", "/whoami"]
)
def test_healthy_endpoint_returns_200(client: FlaskClient, path: str) -> None:
    """Every healthy endpoint answers 200."""
    assert client.get(path).status_code == 200


def test_healthy_endpoints_return_their_inventory_sessions(client: FlaskClient) -> None:
    """Sessions checked out by healthy requests (streaming included) are all returned."""
    for path in ["/items", "/items/2", "/stream", "/stream?low_stock=1"]:
        client.get(path).close()
    assert _json(client, "/")["open_inventory_sessions"] == 0


def test_item_comes_from_g_with_url_for_links(client: FlaskClient) -> None:
    """/items/<id> serves the item the URL preprocessor put on g, with links from url_for."""
    body = _json(client, "/items/2")
    assert body["item"]["name"] == "kettle"
    assert body["item"]["url"] == "/items/2"
    assert body["links"] == {"collection": "/items"}


def test_unknown_item_is_404(client: FlaskClient) -> None:
    """A missing item is a 404, not an error."""
    assert client.get("/items/999").status_code == 404


def test_stream_reads_request_and_config_while_streaming(client: FlaskClient) -> None:
    """The CSV body, produced after the view returned, still sees request args and config."""
    lines = client.get("/stream?low_stock=1").get_data(as_text=True).splitlines()
    assert lines == ["id,name,stock,low_stock", "2,kettle,2,1", "4,tea strainer,0,1"]


def test_config_is_read_at_call_time() -> None:
    """Settings passed to the factory apply, because models read them when called."""
    client = create_app({"SHOP_PAGE_SIZE": 2, "SHOP_LOW_STOCK_THRESHOLD": 50}).test_client()
    items = _json(client, "/items")["items"]
    assert [item["id"] for item in items] == [1, 2]
    assert all(item["low_stock"] for item in items)


def test_app_name_is_stable() -> None:
    """The app is named after the package, whatever imported it."""
    assert create_app().name == APP_NAME == "ctxtrace.example"


def test_wsgi_module_exposes_an_app() -> None:
    """gunicorn ctxtrace.example.wsgi:app finds a Flask app."""
    assert isinstance(importlib.import_module("ctxtrace.example.wsgi").app, Flask)


def test_example_does_not_import_the_agent() -> None:
    """The shop is a plain Flask app: nothing in it imports ctxtrace outside the example."""
    for source in EXAMPLE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{source.name} imports from above the package"
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "ctxtrace" or name.startswith("ctxtrace.example")


# -- seeded faults ---------------------------------------------------------------------------


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_thread_config_fault_sees_no_app_context(client: FlaskClient) -> None:
    """The background thread's config read fails with Flask's RuntimeError; the view is fine."""
    body = _json(client, "/fault/thread-config")
    assert body["finished"] is True
    assert body["error"]["type"] == "RuntimeError"
    assert NO_APP_CONTEXT in body["error"]["message"]


def test_thread_config_fix_passes_the_app(client: FlaskClient) -> None:
    """With the app handed over and a with-block in the thread, the check succeeds."""
    body = _json(client, "/ok/thread-config")
    assert body["error"] is None
    assert body["result"] == [2, 4]


@pytest.mark.ctxtrace_allow("leaked")  # the seeded fault, on purpose
def test_push_no_pop_leaks_one_session_per_call(client: FlaskClient) -> None:
    """The export fails before its pop; its context's session is never returned."""
    first = _json(client, "/fault/push-no-pop")
    assert first["error"]["type"] == "ReportError"
    assert first["open_inventory_sessions"] == 1
    assert _json(client, "/fault/push-no-pop")["open_inventory_sessions"] == 2
    assert _json(client, "/")["open_inventory_sessions"] == 2


def test_push_no_pop_does_not_leak_when_the_export_succeeds() -> None:
    """With a working sink the hand-written pop is reached: the leak needs the failure."""
    client = create_app({"SHOP_REPORT_SINK": "log"}).test_client()
    body = _json(client, "/fault/push-no-pop")
    assert (body["error"], body["result"], body["open_inventory_sessions"]) == (None, 4, 0)


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_import_time_fault_repeats(client: FlaskClient) -> None:
    """Each hit re-imports the module in a context-less thread and fails again."""
    for _ in range(2):
        body = _json(client, "/fault/import-time")
        assert body["error"]["type"] == "RuntimeError"
        assert NO_APP_CONTEXT in body["error"]["message"]
    assert "ctxtrace.example.lazy_settings" not in sys.modules


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_import_time_module_imports_inside_a_context(app: Flask, client: FlaskClient) -> None:
    """The same import works inside an app context, and is not cached for the next hit."""
    with app.app_context():
        settings = load_lazy_settings()
    assert (settings.PAGE_SIZE, settings.LOW_STOCK_THRESHOLD) == (20, 3)
    assert _json(client, "/fault/import-time")["error"]["type"] == "RuntimeError"


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_extension_before_init_fails_outside_a_context(client: FlaskClient) -> None:
    """The writer thread's use of the un-initialised extension raises Flask's RuntimeError."""
    body = _json(client, "/fault/extension-before-init")
    assert body["error"]["type"] == "RuntimeError"
    assert NO_APP_CONTEXT in body["error"]["message"]


def test_extension_before_init_inside_a_context(app: Flask) -> None:
    """Inside a context the missing init_app shows as a KeyError; init_app fixes it."""
    with app.app_context(), pytest.raises(KeyError, match="audit"):
        audit.record("items.viewed")
    audit.init_app(app)
    with app.app_context():
        audit.record("items.viewed")
    assert list(app.extensions["audit"].entries) == ["items.viewed"]


def test_wrong_order_pop_is_caught_and_unwound(client: FlaskClient) -> None:
    """The out-of-order pop raises (AssertionError up to 3.1, RuntimeError on 3.2); the view
    answers and leaves the thread clean."""
    body = _json(client, "/fault/wrong-order")
    if FLASK_BEFORE_3_2:
        assert body["error"]["type"] == "AssertionError"
        assert "Popped wrong app context" in body["error"]["message"]
        assert body["unwound"] == 0
    else:
        assert body["error"]["type"] == "RuntimeError"
        assert "Cannot pop this context" in body["error"]["message"]
        assert body["unwound"] == 2
    assert _json(client, "/whoami")["leaked_marker"] is None
    assert _json(client, "/")["open_inventory_sessions"] == 0


@pytest.mark.ctxtrace_allow("leaked")  # the seeded fault, on purpose
def test_stale_g_on_the_same_thread(client: FlaskClient) -> None:
    """The middleware leaks its context; up to 3.1 the next request on the thread reuses it."""
    assert _json(client, "/whoami")["leaked_marker"] is None
    stale = _json(client, "/fault/stale-g")
    assert stale["marker"] == LEAKED_MARKER
    # The view shares the middleware's g only while requests reuse an active context.
    assert stale["latency_budget_ms"] == (0.0 if FLASK_BEFORE_3_2 else None)
    seen = _json(client, "/whoami")["leaked_marker"]
    assert seen == (LEAKED_MARKER if FLASK_BEFORE_3_2 else None)
    # Leaked on every version: 3.2 only stopped requests from reusing it.
    assert pop_leftover_contexts() == 1


@pytest.mark.ctxtrace_allow("leaked")  # the seeded fault, on purpose
def test_stale_g_reaches_the_next_request_on_a_real_server(app: Flask) -> None:
    """Over HTTP, on a single-threaded werkzeug server, the marker crosses requests up to 3.1."""
    server = make_server("127.0.0.1", 0, app, threaded=False)
    serving = threading.Thread(target=server.serve_forever, name="shop-server", daemon=True)
    serving.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str) -> dict[str, Any]:
        with opener.open(f"http://127.0.0.1:{server.server_port}{path}", timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
            return body

    try:
        before = get("/whoami")
        get("/fault/stale-g")
        after = get("/whoami")
    finally:
        server.shutdown()
        server.server_close()
        serving.join(5)
    assert before == {"leaked_marker": None, "g_attributes": [], "thread": "shop-server"}
    if FLASK_BEFORE_3_2:
        assert after["leaked_marker"] == LEAKED_MARKER
        assert after["g_attributes"] == ["latency_budget_ms", "leaked_marker"]
    else:
        assert (after["leaked_marker"], after["g_attributes"]) == (None, [])
    assert after["thread"] == "shop-server"


def test_background_wait_is_bounded() -> None:
    """A task that outlives its timeout leaves the view waiting no longer than the bound."""
    release = threading.Event()
    outcome = run_in_thread(lambda: release.wait(5), name="slow-task", timeout=0.01)
    release.set()
    assert (outcome.finished, outcome.value, outcome.error) == (False, None, None)


# -- CLI -------------------------------------------------------------------------------------


def test_seed_data_runs_in_an_app_context(app: Flask) -> None:
    """seed-data is wrapped in with_appcontext and succeeds."""
    result = app.test_cli_runner().invoke(args=["seed-data", "--count", "6"])
    assert result.exit_code == 0, result.output
    assert result.output == "seeded 6 items into ctxtrace.example\n"
    with app.app_context():
        assert len(inventory.store().all()) == 6


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_report_config_fails_without_an_app_context(app: Flask) -> None:
    """report-config is not wrapped: Flask's RuntimeError reaches click, exit status 1."""
    result = app.test_cli_runner().invoke(args=["report-config"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)
    assert NO_APP_CONTEXT in str(result.exception)


@pytest.mark.ctxtrace_allow("out_of_context_access")  # the seeded fault, on purpose
def test_report_config_fails_under_the_standalone_group() -> None:
    """The admin group, used outside the flask command, shows the same fault."""
    obj = ScriptInfo(create_app=create_app)
    assert CliRunner().invoke(admin, ["seed-data"], obj=obj).exit_code == 0
    result = CliRunner().invoke(admin, ["report-config"], obj=obj)
    assert result.exit_code == 1
    assert NO_APP_CONTEXT in str(result.exception)


def test_report_config_is_hidden_by_the_flask_command() -> None:
    """FlaskGroup pushes an app context before looking up any app command: no failure there."""
    result = CliRunner().invoke(FlaskGroup(create_app=create_app), ["report-config"])
    assert result.exit_code == 0, result.output
    assert "SHOP_PAGE_SIZE=20\n" in result.output


@pytest.mark.parametrize(("command", "status"), [("seed-data", 0), ("report-config", 1)])
def test_python_m_entry_point(command: str, status: int) -> None:
    """python -m ctxtrace.example runs the admin commands in a real process."""
    # The repository root, for a checkout that is not installed into the environment.
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxtrace.example", command],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert proc.returncode == status, proc.stderr
    if status:
        assert f"RuntimeError: {NO_APP_CONTEXT}" in proc.stderr


# -- scenario table --------------------------------------------------------------------------


def test_scenarios_are_well_formed(app: Flask) -> None:
    """Ids are unique, anomalies are known names, and every trigger exists in the app."""
    assert len({s.id for s in SCENARIOS}) == len(SCENARIOS)
    urls = app.url_map.bind("localhost")
    for scenario in SCENARIOS:
        assert scenario.anomalies
        assert set(scenario.anomalies) <= set(ANOMALY_NAMES)
        assert scenario.cause.endswith(".")
        assert scenario.fix.endswith(".")
        if scenario.kind == "cli":
            assert scenario.trigger in app.cli.commands
        else:
            endpoint, _ = urls.match(scenario.trigger)
            assert endpoint.startswith("faults.")
        for extra in (scenario.follow_up, scenario.fixed_by):
            if extra is not None:
                urls.match(extra)


def test_scenarios_cover_every_fault_endpoint(app: Flask) -> None:
    """Each /fault/... route is described in the table."""
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/fault/")}
    assert routes == {s.trigger for s in SCENARIOS if s.kind == "http"}
