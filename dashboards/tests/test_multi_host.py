"""Two hosts, each scraped through its one address, alerts evaluated centrally (issue 18, 3).

Everything real, on 127.0.0.1: two "hosts" (``ctxtrace run -- gunicorn --workers 2``
on tests/fixtures/telemetry_app.py,
each in a UTS namespace of its own, so that their host names, and the host part of
their ``worker`` labels, differ), each scraped through its one address by a Prometheus
of its own that remote-writes to a central Prometheus
(``--web.enable-remote-write-receiver``) which evaluates the shipped alert rules and
notifies two Alertmanagers in cluster mode; their webhooks go to the test.

- a double pop on one host: one ticket, naming that host's worker;
- one Alertmanager stopped, then a leak on both hosts: one page, grouped, naming a
  worker of each host; no notification lost, none sent twice;
- the central Prometheus has both hosts' series, as the dashboard queries them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

HOSTS = ("host-a", "host-b")
WORKERS = 2
#: Alertmanager's waits: long enough to group both hosts' leaks, short for a test.
TIMING = {"group_wait": "4s", "group_interval": "5m", "repeat_interval": "1h"}
#: Seconds to keep listening after a notification: a duplicate would come by then.
QUIET_S = 10.0
CTXTRACE = "import sys; from ctxtrace.cli import main; sys.exit(main())"


def _prometheus_yml(
    scrape: str | None, remote_write: str | None, rules: Path | None, alertmanagers: list[str]
) -> dict[str, Any]:
    """A Prometheus at 1 s intervals: scraping one host's address and remote-writing it,
    or (central) evaluating the rules and notifying the Alertmanagers."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
    }
    if scrape is not None:
        config["scrape_configs"] = [{
            "job_name": "ctxtrace", "honor_labels": True,
            "static_configs": [{"targets": [scrape]}],
        }]
    if remote_write is not None:
        config["remote_write"] = [{
            "url": remote_write, "queue_config": {"batch_send_deadline": "500ms"},
        }]
    if rules is not None:
        config["rule_files"] = [str(rules)]
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]
        }
    return config


def _notifications(recorder: Any, path: str) -> list[dict[str, Any]]:
    with recorder.lock:
        return [payload for p, payload in recorder.notifications if p == path]


@dataclass
class Fleet:
    """What runs: the central Prometheus (as a Stack), the hosts' web ports, the
    Alertmanagers, the webhook's recorder."""

    stack: Any
    web: dict[str, int]
    alertmanagers: list[subprocess.Popen[bytes]]
    recorder: Any


def _own_host_name(unshare: str) -> list[str]:
    """A UTS namespace of the process's own; without root, inside a user namespace that
    maps the caller to root (CI may run the suite as an ordinary user)."""
    if os.geteuid() == 0:
        return [unshare, "--uts"]
    return [unshare, "--user", "--map-root-user", "--uts"]


@contextlib.contextmanager
def _fleet(
    livestack: ModuleType, binaries: Any, paths: dict[str, Path], rules: Path,
    unshare: str, tmp: Path,
) -> Iterator[Fleet]:
    """The two hosts with their Prometheus, the central one, two clustered Alertmanagers."""
    free = livestack.free_port
    central, ams = free(), [(free(), free()) for _ in range(2)]  # (web, gossip) each
    web = {name: free() for name in HOSTS}
    recorder = livestack.Recorder()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env["PYTHONPATH"] = str(paths["repo"])
    with livestack.webhook(recorder) as hook, livestack.Processes() as processes:
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump(
            livestack.alertmanager_config(paths["exporters"], hook, TIMING)
        ))
        alertmanagers = [
            processes.start([
                binaries.alertmanager, f"--config.file={tmp / 'alertmanager.yml'}",
                f"--storage.path={tmp / f'am{n}'}", f"--web.listen-address=127.0.0.1:{port}",
                f"--cluster.listen-address=127.0.0.1:{gossip}",
                f"--cluster.peer=127.0.0.1:{ams[1 - n][1]}",
                "--cluster.peer-timeout=2s", "--cluster.gossip-interval=100ms",
                "--cluster.pushpull-interval=1s",
            ], tmp / f"am{n}.log")
            for n, (port, gossip) in enumerate(ams)
        ]
        targets = [f"127.0.0.1:{port}" for port, _ in ams]
        _prometheus(processes, binaries, tmp, "central", central, _prometheus_yml(
            None, None, rules, targets
        ), "--web.enable-remote-write-receiver")
        for name in HOSTS:
            metrics = free()
            _prometheus(processes, binaries, tmp, name, free(), _prometheus_yml(
                f"127.0.0.1:{metrics}", f"http://127.0.0.1:{central}/api/v1/write", None, []
            ))
            processes.start([
                *_own_host_name(unshare), "sh", "-c", 'hostname "$0" && exec "$@"', name,
                sys.executable, "-c", CTXTRACE, "run", f"--set=prometheus_port={metrics}",
                "--", sys.executable, "-m", "gunicorn", "--workers", str(WORKERS),
                "--worker-class", "gthread", "--threads", "2", "--no-control-socket",
                "--graceful-timeout", "5", "--bind", f"127.0.0.1:{web[name]}",
                "tests.fixtures.telemetry_app:app",
            ], tmp / f"{name}.log", env=env, cwd=paths["repo"], group=True)
        stack = livestack.Stack(
            f"http://127.0.0.1:{central}", f"http://127.0.0.1:{ams[0][0]}", recorder,
            processes.logs, tmp, rules,
        )
        livestack.wait_for("both hosts' processes centrally", lambda: (
            len(stack.query('process_start_time_seconds{job="ctxtrace"}')) == 2 * (WORKERS + 1)
        ), processes.logs, 60)
        for url in (f"http://127.0.0.1:{port}/api/v2/status" for port, _ in ams):
            livestack.wait_for("the Alertmanager cluster", lambda url=url: len(
                livestack.get_json(url)["cluster"].get("peers") or []
            ) == 2, processes.logs, 30)
        yield Fleet(stack, web, alertmanagers, recorder)


def _prometheus(
    processes: Any, binaries: Any, tmp: Path, name: str, port: int, config: dict[str, Any],
    *flags: str,
) -> None:
    (tmp / f"{name}.yml").write_text(yaml.safe_dump(config))
    processes.start([
        binaries.prometheus, f"--config.file={tmp / f'{name}.yml'}",
        f"--storage.tsdb.path={tmp / f'{name}-data'}", f"--web.listen-address=127.0.0.1:{port}",
        *flags,
    ], tmp / f"prometheus-{name}.log")


def test_two_hosts_one_central_prometheus_two_alertmanagers(
    livestack: ModuleType,
    server_binaries: Any,
    paths: dict[str, Path],
    rules_with_for: Callable[..., Path],
    missing: Callable[[str], None],
    tmp_path: Path,
) -> None:
    """Exact notifications at the webhook, one Alertmanager stopped mid-run."""
    unshare = shutil.which("unshare")
    if unshare is None:
        missing("unshare is not installed (apt-get install -y util-linux)")
    try:
        import gunicorn  # noqa: F401, PLC0415 - probing only
    except ImportError:
        missing("gunicorn is not installed; install the test extra: pip install -e '.[test]'")
    rules = rules_with_for(paths["alerts"], tmp_path / "alerts.yml", "1s", keep_zero=True)
    with _fleet(livestack, server_binaries, paths, rules, str(unshare), tmp_path) as fleet:
        stack, recorder, logs = fleet.stack, fleet.recorder, fleet.stack.logs
        workers = stack.query('process_start_time_seconds{job="ctxtrace"}')
        assert {s["metric"]["worker"].split(":")[0] for s in workers} == set(HOSTS)

        # A double pop on host-a: one ticket, naming host-a's worker that did it.
        _get(f"http://127.0.0.1:{fleet.web['host-a']}/double-pop")
        livestack.wait_for(
            "the ticket", lambda: _notifications(recorder, "/ctxtrace/ticket"), logs, 60
        )
        time.sleep(QUIET_S)
        (ticket,) = _notifications(recorder, "/ctxtrace/ticket")
        named = {a["labels"]["worker"] for a in ticket["alerts"]}
        assert len(named) == 1 and next(iter(named)).startswith("host-a:"), ticket
        assert _notifications(recorder, "/ctxtrace/page") == []

        # One Alertmanager goes; a leak on both hosts: one page listing both.
        livestack.stop(fleet.alertmanagers[0])
        for name in HOSTS:
            _get(f"http://127.0.0.1:{fleet.web[name]}/leak")
        livestack.wait_for(
            "the page", lambda: _notifications(recorder, "/ctxtrace/page"), logs, 60
        )
        time.sleep(QUIET_S)
        (page,) = _notifications(recorder, "/ctxtrace/page")
        paged = {a["labels"]["worker"].split(":")[0] for a in page["alerts"]}
        assert paged == set(HOSTS), page
        assert len(_notifications(recorder, "/ctxtrace/ticket")) == 1

        # The dashboard's worker variable lists both hosts' workers centrally.
        values = stack.label_values("worker", 'ctxtrace_contexts_total{job="ctxtrace"}')
        assert {value.split(":")[0] for value in values} == set(HOSTS)


def _get(url: str) -> str:
    import urllib.request  # noqa: PLC0415 - only here

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
