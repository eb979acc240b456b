"""End to end on a fleet: one fault on several workers, a --preload master, recycled workers.

A tiny app (written into the test's folder) runs under ``ctxtrace run -- gunicorn
--preload --workers 3 --max-requests N``: its module-level code reads ``current_app``, so
the master, which imports it, counts one import-time out-of-context access; route
``/leak`` leaks an app context in a helper thread. Prometheus (exporters/prometheus.yml,
1 s intervals, alerts.yml with every non-zero `for` cut to 3 s) and Alertmanager
(exporters/alertmanager.yml with a 10 s group_wait and a 5 min group_interval, so what
arrives is what a person would get) watch it.

The run leaks on every worker, then sends healthy requests until --max-requests has
recycled a worker that leaked. Then:

- the webhook got exactly one page (one group: the leak, the app, the job, listing every
  leaking worker) and no ticket for the master's import-time fallback, not one per process;
- the recycled worker's page did not resolve when its series went away;
- the dashboard's queries, run as Grafana runs them, show each worker's own numbers:
  the master and the recycled worker in the worker list, the master's import-time
  access in its table, each worker's leaks in the workers table, whole numbers.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # at run time the module comes from the `livestack` fixture
    from livestack import Stack

APP = '''\
"""A tiny Flask app for the fleet end-to-end test."""

import threading

from flask import Flask, current_app

try:
    # Module-level code reading a proxy: an import-time out-of-context access, made in
    # the process that imports this module (the gunicorn master under --preload).
    NAME = current_app.name
except RuntimeError:
    NAME = "fleet"

app = Flask("fleet")


@app.get("/")
def index():
    return "ok"


@app.get("/leak")
def leak():
    # A helper thread pushes an app context and ends without popping it: a leak.
    helper = threading.Thread(target=lambda: app.app_context().push())
    helper.start()
    helper.join()
    return "leaked"
'''
WORKERS = 3
MAX_REQUESTS = 12
TIMING = {"group_wait": "10s", "group_interval": "5m", "repeat_interval": "1h"}
CTXTRACE = "import sys; from ctxtrace.cli import main; sys.exit(main())"
GUNICORN_HINT = "gunicorn is not installed; install the test extra: pip install -e '.[test]'"


def get(url: str) -> str:
    """One request on a connection of its own, so gunicorn spreads them over its workers."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def free_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Fleet:
    """The running fleet and what the test saw of it."""

    stack: Stack
    base: str
    master: str  # worker label of the gunicorn master
    targets: Path
    logs: list[Path]
    started: float
    leakers: set[str] = field(default_factory=set)  # workers Prometheus saw leak
    recycled: set[str] = field(default_factory=set)  # leakers gone after --max-requests

    def registered(self) -> dict[str, str]:
        """worker label -> host:port of every target file now in the folder."""
        found = {}
        for path in self.targets.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, LookupError):
                group = json.loads(path.read_text())[0]
                found[group["labels"]["worker"]] = group["targets"][0]
        return found

    def by_worker(self, expr: str) -> dict[str, float]:
        return {s["metric"]["worker"]: float(s["value"][1]) for s in self.stack.query(expr)}


@pytest.fixture(scope="module")
def fleet(
    livestack: ModuleType,
    start_stack: Callable[..., AbstractContextManager[Stack]],
    missing: Callable[[str], None],
) -> Iterator[Fleet]:
    try:
        import gunicorn  # noqa: F401, PLC0415 - probing only
    except ImportError:
        missing(GUNICORN_HINT)
    with start_stack("e2e-fleet", "3s", keep_zero=True, timing=TIMING) as stack:
        folder = stack.folder
        (folder / "fleetapp.py").write_text(APP)
        port = free_port()
        log = folder / "gunicorn.log"
        command = [
            sys.executable, "-c", CTXTRACE, "run",
            "--set=prometheus_host=127.0.0.1", "--set=prometheus_port=0",
            f"--set=prometheus_targets_dir={folder / 'targets'}", "--",
            sys.executable, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
            "--worker-class", "gthread", "--threads", "2",
            "--max-requests", str(MAX_REQUESTS), "--graceful-timeout", "5",
            "--bind", f"127.0.0.1:{port}", "--no-control-socket", "fleetapp:app",
        ]
        with livestack.Processes() as processes:
            server = processes.start(
                command, log, cwd=folder, group=True,
                env={**_clean_environ(), "PYTHONPATH": str(folder)},
            )
            logs = [*stack.logs, log]
            base = f"http://127.0.0.1:{port}"
            fleet = Fleet(stack, base, "", folder / "targets", logs, time.time())
            livestack.wait_for(
                "the master and every worker registered",
                lambda: len(fleet.registered()) >= WORKERS + 1,
                logs, 30,
            )
            (fleet.master,) = [w for w in fleet.registered() if w.split(":")[1] == str(server.pid)]
            yield fleet


def _clean_environ() -> dict[str, str]:
    """The caller's environment without CTXTRACE_* and OTEL_* settings."""
    import os  # noqa: PLC0415 - only here

    return {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}


@pytest.fixture(scope="module")
def driven(livestack: ModuleType, fleet: Fleet) -> Fleet:
    """Leaks on every worker, then healthy traffic until a leaking worker is recycled."""
    leaked = 'max by (worker) (ctxtrace_anomalies_total{anomaly="leaked"}) > 0'
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        fleet.leakers = set(fleet.by_worker(leaked))
        if len(fleet.leakers) >= WORKERS:
            break
        get(fleet.base + "/leak")
        time.sleep(0.3)  # paced, so a worker is scraped before --max-requests recycles it
    assert len(fleet.leakers) >= WORKERS, (fleet.leakers, livestack.tails(fleet.logs))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fleet.recycled = fleet.leakers - set(fleet.registered())
        if fleet.recycled:
            break
        get(fleet.base + "/")
        time.sleep(0.1)
    assert fleet.recycled, f"no leaking worker was recycled\n{livestack.tails(fleet.logs)}"
    # Prometheus forgets the recycled worker's target and scrapes the new ones.
    livestack.wait_for(
        "Prometheus to drop the recycled worker's target",
        lambda: not set(fleet.by_worker("up == 1")) & fleet.recycled,
        fleet.logs, 20,
    )
    return fleet


def notifications(stack: Stack, path: str) -> list[dict[str, Any]]:
    with stack.recorder.lock:
        return [payload for p, payload in stack.recorder.notifications if p == path]


class TestNotifications:
    """What reaches the people: one page naming the workers, and no ticket."""

    def test_one_page_lists_every_leaking_worker(
        self, livestack: ModuleType, driven: Fleet
    ) -> None:
        """One notification for the leak on all workers, grouped by alert, app and job."""
        stack = driven.stack
        livestack.wait_for(
            "the page", lambda: notifications(stack, "/ctxtrace/page"), driven.logs, 40
        )
        seen = time.time()
        time.sleep(5)  # anything else that was going to arrive with it
        pages = notifications(stack, "/ctxtrace/page")
        assert len(pages) == 1, [p["groupLabels"] for p in pages]
        (page,) = pages
        assert page["groupLabels"] == {
            "alertname": "CtxtraceUnbalancedStack", "app": "fleet", "job": "ctxtrace",
        }
        workers = {alert["labels"]["worker"] for alert in page["alerts"]}
        # It names every worker whose alert was firing a few seconds before the page
        # arrived (one that fired later, after group_wait, waits for group_interval;
        # on a loaded machine a late leaker's alert can), and at least two of them.
        firing = 'ALERTS{alertname="CtxtraceUnbalancedStack", alertstate="firing"}'
        before = {r["metric"]["worker"] for r in stack.query(firing, at=seen - 3)}
        assert workers >= before, (workers, before)
        assert len(workers & driven.leakers) >= 2, (workers, driven.leakers)
        assert all(a["labels"]["severity"] == "critical" for a in page["alerts"])
        assert all(a["status"] == "firing" for a in page["alerts"])
        # Each alert links to the dashboard opened on its job and worker.
        for alert in page["alerts"]:
            url = alert["annotations"]["dashboard_url"]
            assert "var-job=ctxtrace" in url
            assert f"var-worker={urllib.parse.quote_plus(alert['labels']['worker'])}" in url

    def test_no_ticket_for_the_masters_import_time_fallback(
        self, livestack: ModuleType, driven: Fleet
    ) -> None:
        """The master's module-level proxy read is caught by the module (a fallback): it is
        on the dashboard (outcome handled) but opens no ticket, and nothing else does."""
        stack = driven.stack
        livestack.wait_for(
            "the page", lambda: notifications(stack, "/ctxtrace/page"), driven.logs, 40
        )
        time.sleep(5)
        assert notifications(stack, "/ctxtrace/ticket") == []
        handled = stack.query(
            f'ctxtrace_out_of_context_access_total{{worker="{driven.master}", '
            'phase="import", outcome="handled"} > 0'
        )
        assert [s["metric"]["proxy"] for s in handled] == ["current_app"]

    def test_recycled_workers_page_does_not_resolve(self, driven: Fleet) -> None:
        """keep_firing_for holds the alert of a worker whose series are gone."""
        firing = {
            a["labels"]["worker"]
            for a in driven.stack.alerts()
            if a["labels"]["alertname"] == "CtxtraceUnbalancedStack" and a["state"] == "firing"
        }
        assert driven.recycled <= firing


class TestDashboardValues:
    """The dashboard's queries, as Grafana runs them, show each worker's own numbers."""

    def values(
        self, livestack: ModuleType, fleet: Fleet, dashboard: dict[str, Any]
    ) -> dict[str, str]:
        """Every variable at "All" (the regex), the range since the fleet started."""
        end = time.time()
        return {
            "job": ".*", "host": ".*", "app": ".*", "worker": ".*", "datasource": "prometheus",
            "__interval": "1s", "__rate_interval": "4s",
            "__range": f"{int(end - fleet.started) + 5}s",
        }

    def target(self, dashboard: dict[str, Any], title: str, ref: str = "A") -> dict[str, Any]:
        (panel,) = [p for p in dashboard["panels"] if p["title"] == title]
        (target,) = [t for t in panel["targets"] if t["refId"] == ref]
        return target

    def test_worker_list_has_the_master_and_the_recycled_worker(
        self, livestack: ModuleType, driven: Fleet, dashboard: dict[str, Any]
    ) -> None:
        """Every process, from its start: the master (served nothing), recycled workers."""
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        query = livestack.substitute(variables["worker"]["query"], {"job": ".*", "host": ".*"})
        selector, label = livestack.label_values_query(query)
        listed = set(driven.stack.label_values(label, selector))
        assert {driven.master, *driven.leakers} <= listed

    def test_import_time_table_names_the_master(
        self, livestack: ModuleType, driven: Fleet, dashboard: dict[str, Any]
    ) -> None:
        """The master's one import-time access, in its row; no worker has any."""
        target = self.target(dashboard, "Import-time out-of-context accesses per worker")
        expr = livestack.substitute(target["expr"], self.values(livestack, driven, dashboard))
        rows = {(s["metric"]["worker"], s["metric"]["proxy"]): s["value"][1]
                for s in driven.stack.query(expr)}
        assert rows == {(driven.master, "current_app"): "1"}

    def test_workers_table_counts_each_workers_leaks(
        self, livestack: ModuleType, driven: Fleet, dashboard: dict[str, Any]
    ) -> None:
        """Each worker's leaked column is its own count (whole), recycled ones included."""
        values = self.values(livestack, driven, dashboard)
        (table,) = [p for p in dashboard["panels"] if p["title"].startswith("Workers and")]
        (leaked,) = [t for t in table["targets"] if t["legendFormat"] == "leaked"]
        shown = driven.by_worker(livestack.substitute(leaked["expr"], values))
        truth = driven.by_worker(
            'max by (worker) (max_over_time(ctxtrace_anomalies_total{anomaly="leaked"}'
            f'[{values["__range"]}]))'
        )
        for worker in driven.leakers:
            assert shown[worker] == truth[worker] >= 1, (worker, shown, truth)
            assert shown[worker] == int(shown[worker])
        assert shown[driven.master] == 0  # listed, with nothing

    def test_stat_counts_leaks_and_the_import_time_access(
        self, livestack: ModuleType, driven: Fleet, dashboard: dict[str, Any]
    ) -> None:
        """The headline number includes out-of-context accesses, and is a whole number."""
        values = self.values(livestack, driven, dashboard)
        target = self.target(dashboard, "Anomalies in range")
        (result,) = driven.stack.query(livestack.substitute(target["expr"], values))
        total = float(result["value"][1])
        window = values["__range"]
        anomalies = driven.stack.query(
            f"sum(max_over_time(ctxtrace_anomalies_total[{window}]))"
        )
        expected = float(anomalies[0]["value"][1]) + 1  # + the master's import-time access
        assert total == expected
        assert total == int(total)
