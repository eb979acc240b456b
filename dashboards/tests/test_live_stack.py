"""The shipped configs against a real Prometheus and Alertmanager on loopback.

A fake worker serves contract metrics that get worse on every scrape and announces
itself with a file_sd target file, as each ctxtrace worker does. Prometheus runs
exporters/prometheus.yml (1 s intervals, paths pointed into a temp folder) with
dashboards/alerts.yml (every `for` cut to 1 s); Alertmanager runs
exporters/alertmanager.yml with its webhooks pointed at the test. Then every alert must
fire and be routed by severity, and every dashboard query must return data.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ALERTS = {
    "CtxtraceUnbalancedStack",
    "CtxtraceOutOfContextAccess",
    "CtxtraceContextsAccumulating",
    "CtxtraceLongLivedContext",
    "CtxtraceAgentErrors",
    "CtxtraceTelemetryDropped",
}
# Inhibited by CtxtraceUnbalancedStack for the same app and worker (alertmanager.yml).
INHIBITED = {"CtxtraceContextsAccumulating", "CtxtraceLongLivedContext"}
BUCKETS = ("0.0001", "0.001", "0.01", "0.1", "1", "10", "60", "+Inf")
WAIT = 45.0  # seconds; the first scrape alone takes about 6 s


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def exposition(scrape: int) -> str:
    """Contract metrics for worker w1 of app shop, a little worse on every scrape."""
    base = 'app="shop",worker="w1"'
    lines = [
        f'ctxtrace_contexts_total{{kind="request",{base}}} {10 * scrape}',
        f'ctxtrace_contexts_total{{kind="app",{base}}} {10 * scrape}',
        f'ctxtrace_contexts_active{{kind="app",{base}}} {60 + scrape}',
        f'ctxtrace_contexts_active{{kind="request",{base}}} 2',
        'ctxtrace_context_depth_max{worker="w1"} 3',
        f'ctxtrace_anomalies_total{{anomaly="leaked",kind="app",{base}}} {scrape}',
        f'ctxtrace_anomalies_total{{anomaly="long_lived",kind="app",{base}}} {scrape}',
        'ctxtrace_out_of_context_access_total{proxy="current_app",phase="import",worker="w1"} 1',
        f'ctxtrace_out_of_context_access_total{{proxy="g",phase="runtime",worker="w1"}} {scrape}',
        f'ctxtrace_internal_errors_total{{component="metrics",worker="w1"}} {scrape}',
        f'ctxtrace_dropped_total{{what="context",worker="w1"}} {scrape}',
        f'ctxtrace_dropped_total{{what="log",worker="w1"}} {scrape}',
        'target_info{service_name="shop"} 1',
    ]
    for kind in ("app", "request"):
        for index, le in enumerate(BUCKETS):
            lines.append(
                f'ctxtrace_context_duration_seconds_bucket{{kind="{kind}",{base},le="{le}"}} '
                f"{scrape * (index + 1)}"
            )
        count = scrape * len(BUCKETS)
        lines.append(f'ctxtrace_context_duration_seconds_sum{{kind="{kind}",{base}}} {count / 10}')
        lines.append(f'ctxtrace_context_duration_seconds_count{{kind="{kind}",{base}}} {count}')
    return "\n".join(lines) + "\n"


@dataclass
class Recorder:
    """What the fake worker and the webhook saw, shared with their handler threads."""

    scrapes: int = 0
    notifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def serve(recorder: Recorder) -> ThreadingHTTPServer:
    """One loopback server: GET /metrics is the worker, POST anything is the webhook."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with recorder.lock:
                recorder.scrapes += 1
                body = exposition(recorder.scrapes).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with recorder.lock:
                recorder.notifications.append((self.path, payload))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def get_json(url: str) -> Any:
    """GET a JSON document from one of the servers under test."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Callable[[], bool], logs: list[Path]) -> None:
    """Poll `check` until it holds, or fail showing the servers' logs."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


@dataclass
class Stack:
    """Addresses of the running stack and what it has recorded."""

    prometheus: str
    alertmanager: str
    recorder: Recorder
    logs: list[Path]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query; fail on any Prometheus error."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = get_json(url)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def firing(self) -> set[str]:
        """Names of the alerts Prometheus has firing now."""
        alerts = get_json(f"{self.prometheus}/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def prometheus_config(
    exporters: Path, rules: Path, targets: Path, alertmanager_port: int
) -> dict[str, Any]:
    """exporters/prometheus.yml with fast intervals and paths moved into the temp dir."""
    config: dict[str, Any] = yaml.safe_load((exporters / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{alertmanager_port}"
    ]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ctxtrace"]
    job["file_sd_configs"][0]["files"] = [str(targets / "*.json")]
    return config


def alertmanager_config(exporters: Path, webhook_port: int) -> dict[str, Any]:
    """exporters/alertmanager.yml with webhooks to the test and no waiting."""
    config: dict[str, Any] = yaml.safe_load((exporters / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            path = urllib.parse.urlsplit(hook["url"]).path
            hook["url"] = f"http://127.0.0.1:{webhook_port}{path}"
    return config


@pytest.fixture(scope="module")
def stack(
    require_tool: Callable[[str, str], str],
    tmp_path_factory: pytest.TempPathFactory,
    paths: dict[str, Path],
    rules_with_for: Callable[[Path, Path, str], Path],
) -> Iterator[Stack]:
    """Fake worker + webhook, Prometheus and Alertmanager, stopped after the module."""
    apt = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"
    prometheus_bin = require_tool("prometheus", apt)
    alertmanager_bin = require_tool("prometheus-alertmanager", apt)
    tmp = tmp_path_factory.mktemp("live-stack")
    recorder = Recorder()
    server = serve(recorder)
    port = server.server_address[1]

    # What a ctxtrace worker writes for itself: one file_sd file, named after the worker.
    targets = tmp / "targets"
    targets.mkdir()
    target = [{"targets": [f"127.0.0.1:{port}"], "labels": {"worker": "w1"}}]
    (targets / "w1.json").write_text(json.dumps(target))

    rules = rules_with_for(paths["alerts"], tmp / "alerts.yml", "1s")
    prom_port, am_port = free_port(), free_port()
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(prometheus_config(paths["exporters"], rules, targets, am_port))
    )
    (tmp / "alertmanager.yml").write_text(
        yaml.safe_dump(alertmanager_config(paths["exporters"], port))
    )
    commands = {
        "prometheus": [
            prometheus_bin,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        "alertmanager": [
            alertmanager_bin,
            f"--config.file={tmp / 'alertmanager.yml'}",
            f"--storage.path={tmp / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",  # no gossip port on 0.0.0.0
        ],
    }
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for name, command in commands.items():
            log = tmp / f"{name}.log"
            logs.append(log)
            with log.open("wb") as out:
                processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        result = Stack(
            f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}", recorder, logs
        )
        for url in (f"{result.prometheus}/-/ready", f"{result.alertmanager}/-/ready"):
            wait_for(url, functools.partial(answers_ok, url), logs)
        yield result
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.shutdown()
        server.server_close()


def answers_ok(url: str) -> bool:
    """True when the URL answers 200."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def test_every_alert_fires_with_real_data(stack: Stack) -> None:
    """With `for` cut to 1 s, a worker that gets worse every scrape fires every alert."""
    wait_for("all ctxtrace alerts to fire", lambda: stack.firing() >= ALERTS, stack.logs)


def test_alertmanager_pages_critical_and_tickets_warnings(stack: Stack) -> None:
    """critical reaches the pager webhook, warnings the ticket webhook, minus inhibited ones."""

    def received() -> dict[str, set[str]]:
        with stack.recorder.lock:
            seen: dict[str, set[str]] = {}
            for path, payload in stack.recorder.notifications:
                for alert in payload["alerts"]:
                    seen.setdefault(path, set()).add(alert["labels"]["alertname"])
            return seen

    wanted_tickets = ALERTS - INHIBITED - {"CtxtraceUnbalancedStack"}
    wait_for(
        "webhook notifications",
        lambda: (
            received().get("/ctxtrace/ticket", set()) >= wanted_tickets
            and "CtxtraceUnbalancedStack" in received().get("/ctxtrace/page", set())
        ),
        stack.logs,
    )
    seen = received()
    assert seen["/ctxtrace/page"] == {"CtxtraceUnbalancedStack"}
    assert not seen["/ctxtrace/ticket"] & INHIBITED, "the leak page should inhibit these"


def test_target_labels_do_not_shadow_the_agents(stack: Stack) -> None:
    """honor_labels keeps the agent's `worker` label; no exported_worker copies appear."""
    series = stack.query("ctxtrace_contexts_total")
    assert series
    for sample in series:
        assert sample["metric"]["worker"] == "w1"
        assert "exported_worker" not in sample["metric"]


def test_dashboard_queries_return_data(stack: Stack, dashboard: dict[str, Any]) -> None:
    """Every panel query, with the variables filled in as Grafana would, returns series."""
    stack.query("up")  # fail early and clearly if Prometheus is not answering
    wait_for("two samples for rate()", lambda: stack.recorder.scrapes >= 4, stack.logs)
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$app": "shop", "$worker": "w1"}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert stack.query(expr), f"{panel['title']} {target['refId']} returned nothing"


def test_dashboard_variables_list_the_worker(stack: Stack, dashboard: dict[str, Any]) -> None:
    """The app and worker variables' label_values() queries find the fake worker."""
    variables = {v["name"]: v["query"] for v in dashboard["templating"]["list"]}
    for name, value, substitutions in (
        ("app", "shop", {}),
        ("worker", "w1", {"$app": "shop"}),
    ):
        query = variables[name]
        for variable, replacement in substitutions.items():
            query = query.replace(variable, replacement)
        selector = query.removeprefix("label_values(").rsplit(",", 1)[0]
        url = f"{stack.prometheus}/api/v1/label/{name}/values?" + urllib.parse.urlencode(
            {"match[]": selector}
        )
        assert get_json(url)["data"] == [value]
