"""The host's one /metrics: every process's series, exactly, and a bounded time after they end."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest

import ctxtrace
from ctxtrace import _agent
from ctxtrace.telemetry import hostscrape
from ctxtrace.telemetry import metrics as _metrics
from ctxtrace.telemetry.hostscrape import HostCollector, claim
from ctxtrace.telemetry.prometheus import WorkerLabelled
from ctxtrace.telemetry.spool import Spool

from .._exposition import Series, series, small_registry


def _host(folder: Path, own: Any, own_name: str, retain_s: float = 60.0) -> Series:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(folder, own, lambda: own_name, retain_s))
    return series(generate_latest(registry).decode())


def _labelled(count: float, worker: str) -> WorkerLabelled:
    return WorkerLabelled(small_registry(count), worker)


def test_the_host_serves_each_process_as_its_own_endpoint_would(tmp_path: Path) -> None:
    """Union of every process's series, each with its worker label, values unchanged."""
    others = [Spool(tmp_path, _labelled(n, f"h:{n}:gunicorn"), f"h:{n}:gunicorn") for n in (2, 3)]
    for spool in others:
        spool.write()
    own = _labelled(1, "h:1:gunicorn-master")
    expected: Series = {}
    for n, worker in ((1, "h:1:gunicorn-master"), (2, "h:2:gunicorn"), (3, "h:3:gunicorn")):
        plain = series(generate_latest(small_registry(n)).decode())
        expected.update(
            {(name, (*labels, ("worker", worker))): v for (name, labels), v in plain.items()}
        )
    assert _host(tmp_path, own, "h_1_gunicorn-master.prom") == expected
    for spool in others:
        spool.close()


def test_an_ended_process_is_served_for_retain_seconds_then_deleted(tmp_path: Path) -> None:
    """Its last file counts as long as it is younger than retain; then it and its lock go."""
    spool = Spool(tmp_path, _labelled(5, "h:5:rq"), "h:5:rq")
    spool.write()
    spool.close()  # as os._exit would: the lock goes, the file stays
    own = _labelled(1, "h:1:rq")
    assert ("ctxtrace_contexts_total", (("kind", "request"), ("worker", "h:5:rq"))) in _host(
        tmp_path, own, "h_1_rq.prom"
    )
    old = time.time() - 61
    os.utime(spool.path, (old, old))
    served = _host(tmp_path, own, "h_1_rq.prom")
    assert {labels for _, labels in served} == {
        (("kind", "request"), ("worker", "h:1:rq")), (("worker", "h:1:rq"),)
    }
    assert list(tmp_path.iterdir()) == []


def test_a_live_process_is_served_however_old_its_file(tmp_path: Path) -> None:
    """A process that holds its lock is alive: its file is never expired."""
    spool = Spool(tmp_path, _labelled(7, "h:7:celery"), "h:7:celery")
    spool.write()
    old = time.time() - 3600
    os.utime(spool.path, (old, old))
    served = _host(tmp_path, _labelled(1, "h:1:celery"), "h_1_celery.prom")
    assert served[("ctxtrace_contexts_total", (("kind", "request"), ("worker", "h:7:celery")))] == 7
    spool.close()


def test_a_damaged_file_is_skipped(tmp_path: Path) -> None:
    """Text that does not parse costs its own series only."""
    (tmp_path / "h_9_x.prom").write_text("this is { not exposition\n")
    served = _host(tmp_path, _labelled(1, "h:1:x"), "h_1_x.prom")
    assert {labels[-1] for _, labels in served} == {("worker", "h:1:x")}


def test_one_server_at_a_time_and_a_takeover(tmp_path: Path) -> None:
    """The server lock has one holder; once it lets go, the next claim succeeds."""
    first = claim(tmp_path)
    assert first is not None
    assert claim(tmp_path) is None
    os.close(first)
    second = claim(tmp_path)
    assert second is not None
    os.close(second)


def _scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return series(response.read().decode())


def _emitter() -> _metrics.MetricsEmitter:
    agent = _agent.current()
    assert agent is not None
    return next(e for e in agent.emitters if isinstance(e, _metrics.MetricsEmitter))


def test_a_forked_process_that_leaves_by_os_exit_is_counted(
    instrumented: Any, app: Flask, tmp_path: Path
) -> None:
    """An RQ horse in miniature: forked, two contexts, flush, ``os._exit`` before its first
    tick; the host's /metrics serves its exact counts under its own worker label."""
    instrumented(
        metrics="prometheus", prometheus_scrape="host", prometheus_port="0",
        prometheus_spool_dir=str(tmp_path), prometheus_retain="60",
    )
    private = _emitter().private
    assert private is not None and private.host_scrape is not None
    endpoint = private.host_scrape.endpoint
    assert endpoint is not None and private.endpoint is None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            for _ in range(2):
                with app.app_context():
                    pass
            agent = _agent.current()
            assert agent is not None
            agent.flush(5.0)
            os.write(write_end, json.dumps(agent.worker).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read().decode())
    os.waitpid(pid, 0)
    served = _scrape(endpoint.port)
    key = ("ctxtrace_contexts_total", (("app", "shop"), ("kind", "app"), ("worker", child)))
    assert served[key] == 2
    assert ("process_start_time_seconds", (("worker", child),)) in served
    ctxtrace.uninstrument()


def test_the_private_folder_goes_with_its_maker(instrumented: Any) -> None:
    """No folder configured: one of the process tree's own, removed when its maker stops."""
    instrumented(metrics="prometheus", prometheus_scrape="host", prometheus_port="0")
    private = _emitter().private
    assert private is not None and private.host_scrape is not None
    folder = private.host_scrape.folder
    assert folder.is_dir() and folder == hostscrape.private_folder()
    ctxtrace.uninstrument()
    assert not folder.exists()


def test_leftovers_of_dead_writers_are_swept(tmp_path: Path) -> None:
    """A temporary file and a lone lock of a process that died mid-write go once older than
    retain; the lone lock of a live process that has not written yet stays."""
    leftovers = [tmp_path / "h_8_x.prom.8.140", tmp_path / ".h_8_x.lock"]
    for path in leftovers:
        path.write_text("")
        old = time.time() - 61
        os.utime(path, (old, old))
    starting = Spool(tmp_path, _labelled(9, "h:9:x"), "h:9:x")
    starting.write()
    starting.path.unlink()  # as if between taking its lock and its first write
    old = time.time() - 61
    os.utime(tmp_path / ".h_9_x.lock", (old, old))
    _host(tmp_path, _labelled(1, "h:1:x"), "h_1_x.prom")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".h_9_x.lock"]
    starting.close()
