"""A real Prometheus and Alertmanager on loopback, for the tests that need servers.

Shared by ``test_live_stack.py`` (a fake worker) and ``test_e2e.py`` (gunicorn running the
example shop with ctxtrace on). ``conftest.py`` loads this module by path and hands it out
as the ``livestack`` fixture, so it works under any pytest import mode; test modules import
it only for type annotations.

Every server is started on a free 127.0.0.1 port with its data in a temp folder, stopped
by its pid when the ``with`` block ends (also on failure), and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

WAIT = 45.0  # seconds; the first scrape alone takes about 6 s (file_sd updates every 5 s)


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    """GET a JSON document from one of the servers under test."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def answers_ok(url: str) -> bool:
    """True when the URL answers 200."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def tails(logs: Sequence[Path], size: int = 3000) -> str:
    """The end of each log, to show next to a failure."""
    parts = []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        parts.append(f"--- {log.name}\n{text[-size:]}")
    return "\n".join(parts)


def wait_for(
    what: str,
    check: Callable[[], bool],
    logs: Sequence[Path],
    timeout: float = WAIT,
    interval: float = 0.25,
) -> None:
    """Poll `check` until it holds, or fail after `timeout` showing the servers' logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{tails(logs)}")


# -- processes ------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes], *, grace: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; `group`: the process leads a session
    the test started, and whatever is left of it (forked workers) is killed too."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM to pytest acts like Ctrl-C.

    A CI job's time limit (or ``timeout``) sends SIGTERM, on which Python stops on the
    spot, without running a single ``finally``: servers in a session of their own (the
    launcher puts gunicorn in one) would outlive the test. As a KeyboardInterrupt, pytest
    stops the session and still tears every fixture down, which stops them by pid.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Processes:
    """Processes a test starts; leaving the ``with`` block stops each by pid, newest first."""

    def __init__(self) -> None:
        self._started: list[tuple[subprocess.Popen[bytes], bool, float]] = []
        self.logs: list[Path] = []

    def start(
        self,
        command: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        group: bool = False,
        grace: float = 10.0,
    ) -> subprocess.Popen[bytes]:
        """Start `command` with its output in `log`; `group`: in a session of its own."""
        self.logs.append(log)
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=group,
            )
        self._started.append((process, group, grace))
        return process

    def stop_all(self) -> None:
        while self._started:
            process, group, grace = self._started.pop()
            stop(process, grace=grace, group=group)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# -- the webhook (and, for the fake worker, /metrics) -----------------------------------


@dataclass
class Recorder:
    """What the test's HTTP server saw, shared with its handler threads."""

    scrapes: int = 0
    notifications: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """(webhook path, alert) for every alert in every notification so far."""
        with self.lock:
            return [
                (path, alert)
                for path, payload in self.notifications
                for alert in payload["alerts"]
            ]

    def received(self) -> dict[str, set[str]]:
        """Alert names by webhook path."""
        seen: dict[str, set[str]] = {}
        for path, alert in self.alerts():
            seen.setdefault(path, set()).add(alert["labels"]["alertname"])
        return seen


@contextlib.contextmanager
def webhook(
    recorder: Recorder, metrics: Callable[[int], str] | None = None
) -> Iterator[int]:
    """A loopback server that records POSTs (Alertmanager's webhooks); yields its port.

    With `metrics`, GET /metrics answers ``metrics(n)`` for the n-th scrape: a fake worker.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if metrics is None:
                self.send_error(404)
                return
            with recorder.lock:
                recorder.scrapes += 1
                body = metrics(recorder.scrapes).encode()
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- Prometheus and Alertmanager --------------------------------------------------------


@dataclass
class Stack:
    """Addresses of the running Prometheus and Alertmanager, what the webhook recorded,
    and the folder they run in with the rules Prometheus loaded."""

    prometheus: str
    alertmanager: str
    recorder: Recorder
    logs: list[Path]
    folder: Path
    rules: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Run an instant query; fail on any Prometheus error."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = get_json(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode(params))
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """Run a range query, as a Grafana time series panel does; fail on any error."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        url = f"{self.prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params)
        answer = get_json(url)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def label_values(self, label: str, selector: str) -> list[str]:
        """What a Grafana ``label_values(selector, label)`` variable lists."""
        url = f"{self.prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
            {"match[]": selector}
        )
        values: list[str] = get_json(url)["data"]
        return values

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert Prometheus has now, pending or firing."""
        alerts: list[dict[str, Any]] = get_json(f"{self.prometheus}/api/v1/alerts")["data"][
            "alerts"
        ]
        return alerts

    def firing(self) -> set[str]:
        """Names of the alerts Prometheus has firing now."""
        return {a["labels"]["alertname"] for a in self.alerts() if a["state"] == "firing"}

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups with their last evaluation times."""
        groups: list[dict[str, Any]] = get_json(f"{self.prometheus}/api/v1/rules")["data"][
            "groups"
        ]
        return groups


def prometheus_config(
    exporters: Path, rules: Path, targets: Path, alertmanager_port: int
) -> dict[str, Any]:
    """exporters/prometheus.yml with 1 s intervals and paths moved into the temp dir."""
    config: dict[str, Any] = yaml.safe_load((exporters / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{alertmanager_port}"
    ]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ctxtrace"]
    job["file_sd_configs"][0]["files"] = [str(targets / "*.json")]
    return config


#: Alertmanager's waits in most live tests: none worth the name.
NO_WAIT = {"group_wait": "1s", "group_interval": "1s"}


def alertmanager_config(
    exporters: Path, webhook_port: int, timing: Mapping[str, str] = NO_WAIT
) -> dict[str, Any]:
    """exporters/alertmanager.yml with webhooks to the test and `timing` (group_wait,
    group_interval, ...) on its route: no waiting unless a test counts notifications."""
    config: dict[str, Any] = yaml.safe_load((exporters / "alertmanager.yml").read_text())
    config["route"].update(timing)
    # Template paths are relative to the config file, which the test writes elsewhere.
    config["templates"] = [str(exporters / name) for name in config.get("templates", [])]
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            path = urllib.parse.urlsplit(hook["url"]).path
            hook["url"] = f"http://127.0.0.1:{webhook_port}{path}"
    return config


@dataclass(frozen=True)
class Binaries:
    """Where the Prometheus and Alertmanager servers are installed (the `server_binaries`
    fixture finds them, or skips or fails)."""

    prometheus: str
    alertmanager: str


@contextlib.contextmanager
def prometheus_and_alertmanager(
    tmp: Path,
    binaries: Binaries,
    exporters: Path,
    rules: Path,
    targets: Path,
    webhook_port: int,
    recorder: Recorder,
    timing: Mapping[str, str] = NO_WAIT,
) -> Iterator[Stack]:
    """Prometheus (the shipped config, 1 s intervals, `rules`, file_sd over `targets`) and
    Alertmanager (the shipped config, webhooks to `webhook_port`), ready when yielded."""
    prom_port, am_port = free_port(), free_port()
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(prometheus_config(exporters, rules, targets, am_port))
    )
    (tmp / "alertmanager.yml").write_text(
        yaml.safe_dump(alertmanager_config(exporters, webhook_port, timing))
    )
    with Processes() as processes:
        processes.start(
            [
                binaries.prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp / "prometheus.log",
        )
        processes.start(
            [
                binaries.alertmanager,
                f"--config.file={tmp / 'alertmanager.yml'}",
                f"--storage.path={tmp / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",  # no gossip port on 0.0.0.0
            ],
            tmp / "alertmanager.log",
        )
        stack = Stack(
            f"http://127.0.0.1:{prom_port}",
            f"http://127.0.0.1:{am_port}",
            recorder,
            processes.logs,
            tmp,
            rules,
        )
        for url in (f"{stack.prometheus}/-/ready", f"{stack.alertmanager}/-/ready"):
            wait_for(url, functools.partial(answers_ok, url), processes.logs, timeout=20)
        yield stack


@contextlib.contextmanager
def live_stack(
    tmp: Path,
    binaries: Binaries,
    exporters: Path,
    rules: Path,
    worker: tuple[str, Callable[[int], str]] | None = None,
    timing: Mapping[str, str] = NO_WAIT,
) -> Iterator[Stack]:
    """What every live test runs: SIGTERM as Ctrl-C, the webhook, then Prometheus and
    Alertmanager with file_sd over ``tmp/targets``; all stopped when the block ends.

    `worker`, ``(name, metrics)``: the webhook is also a fake worker of that name (see
    `webhook`), announced in ``targets/`` as a ctxtrace worker announces itself, before
    Prometheus starts. Without it, the test starts real workers that write there.
    """
    targets = tmp / "targets"
    targets.mkdir()
    recorder = Recorder()
    metrics = None if worker is None else worker[1]
    with sigterm_as_interrupt(), webhook(recorder, metrics) as port:
        if worker is not None:
            target = [{"targets": [f"127.0.0.1:{port}"], "labels": {"worker": worker[0]}}]
            (targets / f"{worker[0]}.json").write_text(json.dumps(target))
        with prometheus_and_alertmanager(
            tmp, binaries, exporters, rules, targets, port, recorder, timing
        ) as stack:
            yield stack


# -- the dashboard, as Grafana would run it ---------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|{}\[\]]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Fill in Grafana's variables (``$x``, ``${x}``, ``[[x]]``); fail on one without a value."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            pytest.fail(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def regex_value(values: Sequence[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus regex matcher:
    each value regex-escaped, several joined as ``(a|b)``, backslashes doubled for the
    PromQL string."""
    escaped = [_REGEX_SPECIAL.sub(r"\\\g<0>", value) for value in values]
    text = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    return text.replace("\\", "\\\\")


def label_values_query(query: str) -> tuple[str, str]:
    """``label_values(selector, label)`` split into its selector and its label."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"not a label_values() query: {query!r}"
    return match.group(1), match.group(2)


def dashboard_targets(dashboard: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, target) for every query target of every panel."""
    return [
        (f"panel {panel['title']!r} target {target['refId']}", target)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
