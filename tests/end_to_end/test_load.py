"""Load: 16 client threads through real servers, a seeded share of the requests going wrong.

Each wrong request (``tests/fixtures/load_app.py``) makes exactly one anomaly; the
clean ones make none. The checks are exact: every anomaly once, each attributed
to its kind of request, nothing on the clean ones, and the ledger's push and pop
counters equal to what Flask did for the requests the driver sent.

gevent: the same traffic through ``gunicorn -k gevent``, where every request and
every "thread" is a greenlet with contextvars of its own. Supported means what
this test checks: the same exact counts as with real threads.
"""

from __future__ import annotations

import collections
import http.client
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ctxtrace import _agent

from .._servers import (
    REPO,
    free_port,
    run_threads,
    stop,
    wait_for_request_threads,
    wait_until,
    werkzeug_server,
)
from ..fixtures import load_app

THREADS = 16
PER_THREAD = 150
SEED = 8
#: Percent of requests of each kind.
WEIGHTS = {"ok": 70, "leak": 6, "wrong": 6, "double": 6, "foreign": 6, "ooca": 6}
#: Per request, and for a whole run: every wait is bounded.
REQUEST_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 120.0
BIN = Path(sys.executable).parent
#: How long ``/sleep`` sleeps: more than a sweep interval (ctxtrace's default is 1 s).
SLOW_S = 1.5

Plan = list[list[tuple[str, int]]]


def make_plan(seed: int = SEED) -> Plan:
    """Per client thread, the requests it sends: (kind, number)."""
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    plan: Plan = []
    n = 0
    for _ in range(THREADS):
        requests = []
        for kind in rng.choices(kinds, weights, k=PER_THREAD):
            requests.append((kind, n))
            n += 1
        plan.append(requests)
    return plan


def _path(kind: str, n: int) -> str:
    return f"/ok/{n}" if kind == "ok" else f"/{kind}"


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def drive(port: int, plan: Plan) -> list[tuple[str, int, int, str]]:
    """Send every planned request from its own client thread; (kind, n, status, body)."""
    results: list[tuple[str, int, int, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(requests: list[tuple[str, int]]) -> None:
        try:
            for kind, n in requests:
                status, body = get(port, _path(kind, n))
                with lock:
                    results.append((kind, n, status, body))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    clients = [
        threading.Thread(target=client, args=(requests,), name=f"load-client-{i}")
        for i, requests in enumerate(plan)
    ]
    run_threads(clients, timeout=RUN_TIMEOUT_S, what="load clients")
    assert errors == []
    return results


def check_responses(plan: Plan, results: list[tuple[str, int, int, str]]) -> None:
    """Every request answered, 200, with the body its kind gives without ctxtrace."""
    assert len(results) == THREADS * PER_THREAD
    wrong = [
        (kind, n, status, body)
        for kind, n, status, body in results
        if (status, body) != (200, load_app.expected_body(kind, n))
    ]
    assert wrong == []


def check_events(plan: Plan, events: list[dict[str, Any]]) -> None:
    """Exactly one anomaly per wrong request, of its kind; none for the clean ones."""
    sent = collections.Counter(kind for requests in plan for kind, _ in requests)
    found = collections.Counter((e["name"], e["kind"]) for e in events)
    expected = collections.Counter(
        {(load_app.ANOMALY[kind], kind): count for kind, count in sent.items() if kind != "ok"}
    )
    assert found == expected, [e["text"] for e in events if e["kind"] in (None, "ok")][:5]
    # Once each: the anomalies of one request, or of one context, are never repeated.
    for name in ("leaked", "wrong_pop"):
        units = [e["request_unit"] for e in events if e["name"] == name]
        assert None not in units
        assert len(set(units)) == len(units)
    contexts = [e["context_id"] for e in events if e["context_id"] is not None]
    assert len(set(contexts)) == len(contexts)


def check_counts(plan: Plan, counts: dict[str, int], merged: bool, extra: list[str]) -> None:
    """The ledger counted every push and pop Flask did, no more (``extra``: probes)."""
    kinds = [kind for requests in plan for kind, _ in requests] + extra
    expected = load_app.expected_counts(kinds, merged)
    assert {k: counts[k] for k in expected} == expected


# -- threads ----------------------------------------------------------------


def test_threaded_server_counts_every_anomaly_once(instrumented: Any) -> None:
    """2400 requests from 16 threads, 30 % going wrong: exact anomalies and counters."""
    recorder = instrumented()
    agent = _agent.current()
    assert agent is not None
    app = load_app.create_app()
    plan = make_plan()
    with werkzeug_server(app) as port:
        results = drive(port, plan)
    wait_for_request_threads(REQUEST_TIMEOUT_S)
    # What the watchdog does; it must not find anything the requests did not.
    agent.sweep()
    check_responses(plan, results)
    events = [d for d in map(load_app.describe, recorder.events) if d is not None]
    check_events(plan, events)
    snapshot = agent.ledger.snapshot()
    counts = {
        f"{kind}_{what}": sum(getattr(s, what) for s in snapshot if s.kind == kind)
        for kind in ("app", "request")
        for what in ("pushes", "pops")
    }
    check_counts(plan, counts, agent.shape.merged, extra=[])
    assert agent.dropped()["context"] == 0
    assert agent.errors.counts() == {}
    # The leaked contexts died with their request threads: nothing is tracked any more.
    assert agent.ledger.live_count() == 0


def test_the_plan_mixes_every_kind() -> None:
    """The seeded plan sends each kind of request, the clean ones most."""
    sent = collections.Counter(kind for requests in make_plan() for kind, _ in requests)
    assert set(sent) == set(load_app.KINDS)
    assert sent["ok"] > THREADS * PER_THREAD // 2
    assert min(sent.values()) > 50


# -- gevent -----------------------------------------------------------------

needs_gevent = pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None,
    reason="gevent is not installed (pip install gevent): gunicorn's gevent worker is untested",
)


@pytest.fixture(scope="module")
def gevent_probe() -> dict[str, Any]:
    """What ``tests/fixtures/gevent_leaks.py`` reports, run once in a process of its own."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fixtures" / "gevent_leaks.py")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@needs_gevent
def test_gevent_leaks_in_threads_and_greenlets_are_reported(gevent_probe: dict[str, Any]) -> None:
    """Under monkey-patching, a leak in a patched thread and in a bare greenlet: one each."""
    leaks = sorted((leak["thread"], leak["reason"]) for leak in gevent_probe["leaked"])
    assert len(leaks) == 2
    # A patched thread is a unit: its leak is found when its ``run`` ends.
    assert leaks[1] == ("patched-thread", "unit_end")
    # A bare greenlet is not; gevent gives it a stand-in thread, and the watchdog
    # finds its leak once the context is collected.
    assert leaks[0][0].startswith("Dummy-")
    assert leaks[0][1] == "collected"
    assert gevent_probe["others"] == []
    assert gevent_probe["live"] == 0
    assert gevent_probe["internal_errors"] == {}


@needs_gevent
def test_threads_integration_installs_under_gevent(gevent_probe: dict[str, Any]) -> None:
    """gevent's patched Thread inherits ``start``: the threads integration still installs."""
    assert gevent_probe["internal_errors"] == {}


#: Every way the README gives of turning ctxtrace on, under ``gunicorn -k gevent``:
#: (launcher before gunicorn, gunicorn options, ``LOAD_APP_ENABLE``). gevent patches
#: the worker after the fork, after --preload's import and after ctxtrace's at-fork
#: reset; what ctxtrace made per thread before must not be shared by every greenlet.
GEVENT_WAYS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "instrument": ((), (), "instrument"),
    "instrument-preload": ((), ("--preload",), "instrument"),
    "extension-preload": ((), ("--preload",), "extension"),
    "ctxtrace-run": (("ctxtrace", "run", "--"), (), "outside"),
    "ctxtrace-run-preload": (("ctxtrace", "run", "--"), ("--preload",), "outside"),
    "opentelemetry-instrument-preload": (("opentelemetry-instrument",), ("--preload",), "outside"),
}


def _gevent_gunicorn(
    tmp_path: Path, way: str, app: str = "tests.fixtures.load_app:app"
) -> tuple[subprocess.Popen[bytes], int, Path, Path]:
    """``gunicorn -k gevent -w 1`` with ctxtrace turned on ``way``; (process, port, events, log)."""
    launcher, options, enable = GEVENT_WAYS[way]
    port, events_file, log = free_port(), tmp_path / "events.jsonl", tmp_path / "gunicorn.log"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CTXTRACE_", "OTEL_")) and k != "PYTHONPATH"
    }
    env[load_app.EVENTS_ENV] = str(events_file)
    env[load_app.ENABLE_ENV] = enable
    if enable == "outside":
        env.update(
            CTXTRACE_METRICS="none", CTXTRACE_SPANS="off", CTXTRACE_LOG_RATE_WINDOW="off",
            OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
        )
    command = [
        *([str(BIN / launcher[0]), *launcher[1:]] if launcher else []),
        str(BIN / "gunicorn"), "-k", "gevent", "-w", "1", "--worker-connections", "200",
        *options, "--no-control-socket", "--graceful-timeout", "5",
        "-b", f"127.0.0.1:{port}", app,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, port, events_file, log


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> list[str]:
    """Wait (bounded) for the worker to answer ``/ok/0``; the probes it answered."""
    probes: list[str] = []

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited: {log.read_text()[-2000:]}", pytrace=False)
        try:
            status, _ = get(port, "/ok/0")
        except OSError:
            return False
        probes.append("ok")
        return status == 200

    wait_until(ready, timeout=30, what="gunicorn's gevent worker")
    return probes


def _own_tracebacks(log: Path) -> list[str]:
    """Tracebacks in the server's output (ctxtrace's threads dying at exit among them)."""
    text = log.read_text(errors="replace")
    return [chunk[:600] for chunk in text.split("Traceback")[1:]]


@needs_gevent
@pytest.mark.parametrize("way", list(GEVENT_WAYS))
def test_gunicorn_gevent_worker_counts_every_anomaly_once(tmp_path: Path, way: str) -> None:
    """The same traffic through ``gunicorn -k gevent``, ctxtrace on each way: greenlets
    count as threads do, and the worker exits without a traceback."""
    process, port, events_file, log = _gevent_gunicorn(tmp_path, way)
    try:
        probes = _wait_ready(process, port, log)
        plan = make_plan()
        results = drive(port, plan)
        status, body = get(port, "/_stats")
    finally:
        stop(process, grace=10, group=True)
    assert status == 200, log.read_text()[-2000:]
    stats = json.loads(body)
    assert stats["instrumented"] is True
    check_responses(plan, results)
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    check_events(plan, events)
    # The stats request itself is pushed (and counted) but not popped yet.
    stats["request_pops"] += 1
    stats["app_pops"] += 0 if stats["merged"] else 1
    check_counts(plan, stats, stats["merged"], extra=[*probes, "ok"])
    assert stats["dropped"] == 0
    assert stats["internal_errors"] == {}
    assert _own_tracebacks(log) == []


@needs_gevent
@pytest.mark.parametrize("way", list(GEVENT_WAYS))
def test_gunicorn_gevent_slow_request_is_clean(tmp_path: Path, way: str) -> None:
    """One request that sleeps past the watchdog's sweeps (greenlets switch meanwhile):
    no anomaly, and no traceback when the worker exits."""
    process, port, events_file, log = _gevent_gunicorn(tmp_path, way)
    try:
        _wait_ready(process, port, log)
        status, body = get(port, f"/sleep/{SLOW_S}")
        assert (status, body) == (200, "slept"), log.read_text()[-2000:]
        status, _ = get(port, "/_stats")  # runs a sweep, after the watchdog's own
        assert status == 200
    finally:
        stop(process, grace=10, group=True)
    lines = events_file.read_text().splitlines() if events_file.exists() else []
    assert lines == []
    assert _own_tracebacks(log) == []
