"""End to end: the example shop under gunicorn with ctxtrace on, a real Prometheus, a real
Alertmanager, and the dashboard's queries and the alert rules run against what they record.

Each run starts the shop with the demo's launcher, ``ctxtrace.example.serve.start_server``
(``ctxtrace run -- gunicorn`` with 2 gthread workers; every worker serves its own /metrics
on the first free port of a range and writes its file_sd target file into a temp folder),
Prometheus with exporters/prometheus.yml (1 s scrape and evaluation, file_sd over that
folder, dashboards/alerts.yml with every non-zero `for` cut to a few seconds) and
Alertmanager with exporters/alertmanager.yml, its webhooks pointed at a receiver in this
test. Every request closes its connection, so gunicorn spreads them over both workers.

- The faulty run drives the shop's seeded faults (scenarios.SCENARIOS) until each worker's
  own /metrics shows leaks, a wrong pop and out-of-context access, then checks Prometheus,
  every dashboard query and the two alerts that must page or ticket.
- The healthy run drives only the shop's healthy endpoints, for longer than the longest
  shortened `for`, and nothing may even turn pending.

The faulty run's servers are stopped before the healthy run starts (class-scoped fixtures).
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ctxtrace.example import APP_NAME, SCENARIOS, serve
from tests._servers import free_range

if TYPE_CHECKING:  # at run time the module comes from the `livestack` fixture
    from livestack import Stack

GUNICORN_HINT = "gunicorn is not installed; install the test extra: pip install -e '.[test]'"
# Alerts the faults must fire, and the webhook path alertmanager.yml routes each to.
MUST_FIRE = {
    "CtxtraceUnbalancedStack": "/ctxtrace/page",
    "CtxtraceOutOfContextAccess": "/ctxtrace/ticket",
}
# What each worker's own /metrics must show before Prometheus is asked anything.
FAULTS = ("leaked", "wrong_pop", "out_of_context_access")
HEALTHY_PATHS = ("/", "/items", "/items/1", "/stream?low_stock=1", "/ok/thread-config", "/whoami")
SHORT_FOR = "3s"  # every non-zero `for` in the rules Prometheus loads
METRIC_PORTS = 16  # size of the port range the agent picks each process's /metrics port from
ROUNDS = 20  # most rounds of fault requests a run may send
# Grafana with the data source's scrape interval set to the real 1 s (the README says to):
# $__interval never drops below it, and $__rate_interval = max($__interval + 1s, 4 * 1s).
INTERVAL, RATE_INTERVAL = "1s", "4s"
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(duration: str) -> float:
    """A Prometheus duration (``15m``, ``1h30m``, ``0s``) in seconds."""
    return sum(int(n) * _SECONDS[unit] for n, unit in _DURATION.findall(duration))


def get(url: str) -> str:
    """One request on a connection of its own, so gunicorn spreads them over its workers."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(target: str) -> Sample:
    """Every sample a worker's /metrics shows now."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(get(f"http://{target}/metrics"))
        for s in family.samples
    }


def total(samples: Sample, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def counts(samples: Sample) -> dict[str, float]:
    """Pushes, each anomaly and out-of-context accesses, as one worker reports them."""
    result = {"pushes": total(samples, "ctxtrace_contexts_total")}
    for anomaly in ("leaked", "long_lived", "wrong_pop", "double_pop", "foreign_pop",
                    "stale_context"):
        result[anomaly] = total(samples, "ctxtrace_anomalies_total", anomaly=anomaly)
    result["out_of_context_access"] = total(samples, "ctxtrace_out_of_context_access_total")
    result["internal_errors"] = total(samples, "ctxtrace_internal_errors_total")
    return result


@dataclass
class Shop:
    """The example shop under gunicorn: where it answers, and its workers' /metrics."""

    base: str
    master: int
    workers: dict[str, str]  # worker label -> host:port of its /metrics
    logs: list[Path]

    def counts(self) -> dict[str, dict[str, float]]:
        return {worker: counts(scrape(target)) for worker, target in self.workers.items()}


@dataclass
class Run:
    """One run: the shop, the servers watching it, and what the test did to it."""

    shop: Shop
    stack: Stack
    started: float  # wall clock, for range queries
    rules: Path
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)  # alerts seen (healthy run)

    @property
    def logs(self) -> list[Path]:
        return [*self.stack.logs, *self.shop.logs]

    @property
    def workers(self) -> set[str]:
        return set(self.shop.workers)


@contextlib.contextmanager
def start_shop(livestack: ModuleType, tmp: Path) -> Iterator[Shop]:
    """The demo's launcher: ``ctxtrace run -- gunicorn -w 2 -k gthread`` on the example app,
    ready (every worker registered and answering) when yielded, stopped by pid after."""
    low, high = free_range(METRIC_PORTS)
    server = serve.start_server(
        tmp, workers=2, threads=4, server="gunicorn",
        options={"prometheus_port": f"{low}-{high}"},
    )
    with server:
        workers = {
            worker: target
            for worker, target in server.targets().items()
            if serve.worker_pid(worker) != server.master_pid
        }
        assert len(workers) == 2, server.targets()
        yield Shop(server.url, server.master_pid, workers, [server.log_path])


@pytest.fixture(scope="session")
def live_run(
    livestack: ModuleType,
    start_stack: Callable[..., AbstractContextManager[Stack]],
    missing: Callable[[str], None],
) -> Callable[[str], AbstractContextManager[Run]]:
    """``live_run(name)``: webhook, Prometheus, Alertmanager and the shop, all stopped by
    pid on the way out; the faulty and the healthy run differ only in `name`."""

    @contextlib.contextmanager
    def run(name: str) -> Iterator[Run]:
        if not serve.gunicorn_available():
            missing(GUNICORN_HINT)  # the launcher would fall back to werkzeug: one process
        started = time.time()
        with (
            # Prometheus first: the agent then skips its port if the range happens to hold it.
            start_stack(name, SHORT_FOR, keep_zero=True) as stack,
            start_shop(livestack, stack.folder) as shop,
        ):
            yield Run(shop, stack, started, stack.rules)

    return run


# Alerts on the monitoring itself keep their real `for` (15m) in the live rules; with
# the shop up and scraped they have nothing to fire on, so the wait ignores them.
FLEET_ALERTS = {"CtxtraceTargetDown", "CtxtraceMetricsAbsent"}


def longest_for(rules: Path) -> float:
    """The longest shortened `for` in a rules file, in seconds."""
    data = yaml.safe_load(rules.read_text())
    return max(
        seconds(str(rule.get("for", "0s")))
        for group in data["groups"]
        for rule in group["rules"]
        if "alert" in rule and rule["alert"] not in FLEET_ALERTS
    )


def wait_until_scraped(livestack: ModuleType, run: Run, samples: int) -> None:
    """Until Prometheus holds `samples` scrapes of every worker (rates need two)."""
    expr = 'min by (worker) (count_over_time(ctxtrace_contexts_total{kind="request"}[1m]))'

    def scraped() -> bool:
        found = {
            s["metric"]["worker"]: float(s["value"][1]) for s in run.stack.query(expr)
        }
        return all(found.get(worker, 0) >= samples for worker in run.workers)

    # The first scrape takes about 6 s (file_sd hands new targets over every 5 s).
    livestack.wait_for(f"{samples} scrapes of both workers", scraped, run.logs, 30)


def drive_faults(livestack: ModuleType, run: Run) -> None:
    """Rounds of every HTTP fault (and its follow-up) until both workers saw each of FAULTS.

    gunicorn hands each connection to whichever worker accepts it first, so it takes a
    round or two until both have had every fault. A leak in a finished thread is counted
    when the agent's sweep (every second) finds it: after ROUNDS rounds the loop only
    waits, until its deadline.
    """
    deadline = time.monotonic() + 30
    requests = [
        path
        for scenario in SCENARIOS
        if scenario.kind == "http"
        for path in (scenario.trigger, scenario.follow_up)
        if path
    ]

    def missing() -> dict[str, list[str]]:
        run.counts = run.shop.counts()
        return {
            worker: [fault for fault in FAULTS if not seen[fault]]
            for worker, seen in run.counts.items()
            if any(not seen[fault] for fault in FAULTS)
        }

    while (lacking := missing()) and time.monotonic() < deadline:
        if run.rounds < ROUNDS:
            run.rounds += 1
            for path in requests:
                get(run.shop.base + path)
        time.sleep(0.25)
    assert not lacking, (
        f"after {run.rounds} rounds some workers never showed {lacking}: {run.counts}\n"
        + livestack.tails(run.logs)
    )


def grafana_values(
    livestack: ModuleType, run: Run, dashboard: dict[str, Any], app: str | None
) -> dict[str, str]:
    """Variable values as Grafana fills them in: `app` None means "All" (``.*``); job and
    host at "All"; the workers are the two that serve (the test narrows further)."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    app_value = variables["app"]["allValue"] if app is None else livestack.regex_value([app])
    every = {"job": variables["job"]["allValue"], "host": variables["host"]["allValue"]}
    selector, label = livestack.label_values_query(
        livestack.substitute(variables["worker"]["query"], every)
    )
    workers = run.stack.label_values(label, selector)
    # Every process is listed from its start: the two workers and the gunicorn master.
    assert set(workers) >= run.workers, f"worker variable lists {workers}"
    assert {serve.worker_pid(w) for w in workers} >= {run.shop.master}, workers
    end = time.time()
    return {
        **every,
        "app": app_value,
        "worker": livestack.regex_value(sorted(run.workers)),
        "datasource": "prometheus",
        "__interval": INTERVAL,
        "__rate_interval": RATE_INTERVAL,
        "__range": f"{int(end - run.started) + 1}s",
    }


def per_worker(expr: str) -> bool:
    """True when the query's result is split by worker (a `by (...)` naming it)."""
    return any(
        "worker" in (label.strip() for label in labels.split(","))
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr)
    )


def import_faulted(run: Run, worker_regex: str) -> set[str]:
    """The workers among `worker_regex` that counted an import-time out-of-context access."""
    query = (
        'ctxtrace_out_of_context_access_total{phase="import", '
        f'worker=~"{worker_regex}"}} > 0'
    )
    return {series["metric"]["worker"] for series in run.stack.query(query)}


def run_target(run: Run, target: dict[str, Any], expr: str) -> list[dict[str, Any]]:
    """The query as its panel runs it: instant, or a range over the run at 1 s steps."""
    if target.get("instant"):
        return run.stack.query(expr)
    return run.stack.query_range(expr, run.started, time.time(), 1.0)


# -- the faulty run ---------------------------------------------------------------------


# Class-scoped: the faulty run's servers stop before the healthy run's start.
@pytest.fixture(scope="class")
def faulty(
    livestack: ModuleType, live_run: Callable[[str], AbstractContextManager[Run]]
) -> Iterator[Run]:
    with live_run("e2e-faulty") as result:
        drive_faults(livestack, result)
        yield result


class TestFaultyTraffic:
    """Leaks, a wrong pop and out-of-context access in both workers."""

    def test_both_workers_saw_every_fault(self, faulty: Run) -> None:
        """Each worker's own /metrics counts pushes, leaks, wrong pops, out-of-context access."""
        assert len(faulty.workers) == 2
        for worker, seen in faulty.counts.items():
            assert seen["pushes"] > 0, (worker, seen)
            for fault in FAULTS:
                assert seen[fault] > 0, (worker, fault, seen)

    def test_prometheus_has_nonzero_pushes_for_both_workers(
        self, livestack: ModuleType, faulty: Run
    ) -> None:
        """Through file_sd, Prometheus scrapes both workers and both report pushes."""
        expr = "sum by (worker) (ctxtrace_contexts_total) > 0"

        def both() -> bool:
            return {s["metric"]["worker"] for s in faulty.stack.query(expr)} >= faulty.workers

        livestack.wait_for("pushes of both workers in Prometheus", both, faulty.logs, 30)
        for sample in faulty.stack.query("ctxtrace_contexts_total"):
            assert "exported_worker" not in sample["metric"]  # honor_labels kept the agent's

    def test_alerts_fire_and_reach_the_webhook_per_worker(
        self, livestack: ModuleType, faulty: Run
    ) -> None:
        """Both must-fire alerts fire for both workers and reach their receivers."""

        def delivered() -> dict[str, set[str]]:
            workers: dict[str, set[str]] = {}
            for path, alert in faulty.stack.recorder.alerts():
                name = alert["labels"]["alertname"]
                if MUST_FIRE.get(name) == path and alert["status"] == "firing":
                    workers.setdefault(name, set()).add(alert["labels"].get("worker", ""))
            return workers

        livestack.wait_for(
            f"{sorted(MUST_FIRE)} firing for both workers at the webhook",
            lambda: all(delivered().get(name, set()) >= faulty.workers for name in MUST_FIRE),
            faulty.logs,
            30,
        )
        assert faulty.stack.firing() >= set(MUST_FIRE)
        for _path, alert in faulty.stack.recorder.alerts():
            labels = alert["labels"]
            if labels["alertname"] in MUST_FIRE:
                assert labels["worker"] in faulty.workers, labels
                assert labels["worker"] in alert["annotations"]["description"], alert
            if labels["alertname"] == "CtxtraceUnbalancedStack":
                assert labels["app"] == APP_NAME, labels

    @pytest.mark.parametrize("selection", ["all", "each"])
    def test_every_dashboard_query_returns_data(
        self,
        livestack: ModuleType,
        faulty: Run,
        dashboard: dict[str, Any],
        selection: str,
    ) -> None:
        """Every panel query returns series; per-worker ones return the selected workers."""
        wait_until_scraped(livestack, faulty, 5)
        choices: list[tuple[str | None, list[str]]]
        if selection == "all":
            choices = [(None, sorted(faulty.workers))]
        else:
            choices = [(APP_NAME, [worker]) for worker in sorted(faulty.workers)]
        empty, wrong = [], []
        for app, workers in choices:
            values = grafana_values(livestack, faulty, dashboard, app)
            values["worker"] = livestack.regex_value(workers)
            for where, target in livestack.dashboard_targets(dashboard):
                expr = livestack.substitute(target["expr"], values)
                result = run_target(faulty, target, expr)
                # At least these workers, and no others.
                required = set(workers)
                if 'phase="import"' in expr:
                    # The shop's import-time fault imports a module once per process: only
                    # the workers that got that request must have one to show (a panel
                    # that fills in zeros shows the others too).
                    required = import_faulted(faulty, values["worker"])
                    if not required:
                        continue
                if not result:
                    empty.append(f"{where}: {expr}")
                elif per_worker(target["expr"]):
                    found = {series["metric"].get("worker") for series in result}
                    if not required <= found <= set(workers):
                        wrong.append(f"{where}: workers {sorted(map(str, found))}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        assert not wrong, f"per-worker queries missing workers of {choices}:\n" + "\n".join(wrong)

    def test_panels_show_each_workers_own_counts(
        self, livestack: ModuleType, faulty: Run, dashboard: dict[str, Any]
    ) -> None:
        """Values, not just series: the workers table, the anomaly and out-of-context panels
        and the stat show what each worker's own /metrics counted, under that worker."""
        wanted = ("leaked", "wrong_pop")
        expr = 'sum by (worker, anomaly) (ctxtrace_anomalies_total{anomaly=~"leaked|wrong_pop"})'

        def settled() -> bool:
            # Prometheus has scraped each worker's latest counts (the agent's sweep may
            # still be finding leaks from the last round).
            faulty.counts = faulty.shop.counts()
            seen = {
                (s["metric"]["worker"], s["metric"]["anomaly"]): float(s["value"][1])
                for s in faulty.stack.query(expr)
            }
            return all(
                seen.get((worker, anomaly)) == counts[anomaly]
                for worker, counts in faulty.counts.items()
                for anomaly in wanted
            )

        livestack.wait_for("Prometheus to hold each worker's counts", settled, faulty.logs, 30)
        values = grafana_values(livestack, faulty, dashboard, None)
        panels = {panel["title"]: panel for panel in dashboard["panels"]}

        def instant(title: str, legend: str) -> dict[str, float]:
            (target,) = [t for t in panels[title]["targets"] if t["legendFormat"] == legend]
            result = faulty.stack.query(livestack.substitute(target["expr"], values))
            return {s["metric"]["worker"]: float(s["value"][1]) for s in result}

        for anomaly in wanted:
            shown = instant("Workers and their anomaly counts", anomaly)
            for worker, counts in faulty.counts.items():
                assert shown[worker] == counts[anomaly], (anomaly, worker, shown, counts)

        def peaks(title: str) -> dict[tuple[str, str], float]:
            """The highest point of each series of a time series panel over the run."""
            (target,) = panels[title]["targets"]
            result = run_target(faulty, target, livestack.substitute(target["expr"], values))
            return {
                (s["metric"]["worker"], s["metric"].get("anomaly") or s["metric"]["proxy"]):
                max(float(v) for _, v in s["values"])
                for s in result
            }

        anomalies = peaks("Anomalies by anomaly and worker")
        for worker in faulty.workers:
            for anomaly in wanted:
                assert anomalies[(worker, anomaly)] >= 1, (worker, anomaly, anomalies)
        runtime = {
            worker: total(scrape(target), "ctxtrace_out_of_context_access_total", phase="runtime")
            for worker, target in faulty.shop.workers.items()
        }
        accesses = peaks("Runtime out-of-context accesses by worker and proxy")
        for worker, count in runtime.items():
            best = max((v for (w, _), v in accesses.items() if w == worker), default=0.0)
            assert (best >= 1) == (count >= 1), (worker, count, accesses)
        (stat,) = panels["Anomalies in range"]["targets"]
        (result,) = faulty.stack.query(livestack.substitute(stat["expr"], values))
        everything = sum(
            counts[name] for counts in faulty.counts.values()
            for name in ("leaked", "long_lived", "wrong_pop", "double_pop", "foreign_pop",
                         "stale_context", "out_of_context_access")
        )
        # Whole numbers, and at least what the two workers counted (the master may add
        # an access of its own).
        assert float(result["value"][1]) == int(float(result["value"][1])) >= everything

    def test_dashboard_variables_list_app_and_both_workers(
        self, livestack: ModuleType, faulty: Run, dashboard: dict[str, Any]
    ) -> None:
        """`app` lists the shop; `worker` lists both workers and the master (which serves
        nothing, but has its own /metrics and may have alerts of its own)."""
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        every = {"job": ".*", "host": ".*"}
        query = livestack.substitute(variables["app"]["query"], every)
        selector, label = livestack.label_values_query(query)
        assert faulty.stack.label_values(label, selector) == [APP_NAME]
        query = livestack.substitute(variables["worker"]["query"], every)
        selector, label = livestack.label_values_query(query)
        listed = set(faulty.stack.label_values(label, selector))
        assert {serve.worker_pid(worker) for worker in listed - faulty.workers} == {
            faulty.shop.master
        }
        assert listed >= faulty.workers


# -- the healthy run --------------------------------------------------------------------


@pytest.fixture(scope="class")
def healthy(
    livestack: ModuleType, live_run: Callable[[str], AbstractContextManager[Run]]
) -> Iterator[Run]:
    with live_run("e2e-healthy") as result:

        def healthy_round() -> None:
            result.rounds += 1
            for path in HEALTHY_PATHS:
                get(result.shop.base + path)

        # A worker's series appear with its first context: reach both workers first.
        for _ in range(ROUNDS):
            healthy_round()
            if all(seen["pushes"] for seen in result.shop.counts().values()):
                break
        else:
            pytest.fail(f"{ROUNDS} rounds of healthy traffic missed a worker")
        # Then the rules are evaluated on data from both workers for longer than the
        # longest `for` plus a few evaluations, under traffic; every alert Prometheus
        # has meanwhile, pending or firing, is noted.
        wait_until_scraped(livestack, result, 1)
        # Until the shop was scraped Prometheus had no ctxtrace series at all, so
        # CtxtraceMetricsAbsent was rightly pending: wait for an evaluation that clears it.
        livestack.wait_for(
            "CtxtraceMetricsAbsent to clear once the shop is scraped",
            lambda: not [
                a for a in result.stack.alerts() if a["labels"]["alertname"] in FLEET_ALERTS
            ],
            result.logs,
            10,
        )
        until = time.monotonic() + longest_for(result.rules) + 4
        evaluated_after = time.time() + longest_for(result.rules) + 1
        while time.monotonic() < until:
            healthy_round()
            result.seen.extend(result.stack.alerts())
            time.sleep(0.3)
        livestack.wait_for(
            "a rule evaluation after the longest `for`",
            lambda: all(
                _timestamp(group["lastEvaluation"]) > evaluated_after
                for group in result.stack.rule_groups()
            ),
            result.logs,
            10,
        )
        result.seen.extend(result.stack.alerts())
        result.counts = result.shop.counts()
        yield result


class TestHealthyTraffic:
    """Only the shop's healthy endpoints, for longer than every shortened `for`."""

    def test_healthy_traffic_fires_nothing(self, healthy: Run) -> None:
        """No alert turns pending or firing, and the webhook receives nothing."""
        assert healthy.seen == []
        assert healthy.stack.alerts() == []
        assert healthy.stack.recorder.notifications == []

    def test_healthy_traffic_reached_both_workers_cleanly(self, healthy: Run) -> None:
        """Both workers pushed contexts and counted no anomaly (the silence is not a blind spot)."""
        assert len(healthy.workers) == 2
        for worker, seen in healthy.counts.items():
            assert seen["pushes"] > 0, (worker, seen)
            assert {k: v for k, v in seen.items() if k != "pushes" and v} == {}, (worker, seen)


def _timestamp(text: str) -> float:
    """Prometheus' RFC 3339 timestamp (nanoseconds, Z) as seconds since the epoch."""
    head, _, fraction = text.rstrip("Z").partition(".")
    when = datetime.fromisoformat(head + "+00:00").timestamp()
    return when + (float("0." + fraction) if fraction else 0.0)
