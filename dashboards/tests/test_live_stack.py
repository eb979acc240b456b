"""The shipped configs against a real Prometheus and Alertmanager on loopback.

A fake worker serves contract metrics that get worse on every scrape and announces
itself with a file_sd target file, as each ctxtrace worker does. Prometheus runs
exporters/prometheus.yml (1 s intervals, paths pointed into a temp folder) with
dashboards/alerts.yml (every `for` cut to 1 s); Alertmanager runs
exporters/alertmanager.yml with its webhooks pointed at the test. Then every alert must
fire and be routed by severity, and every dashboard query must return data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # at run time the module comes from the `livestack` fixture
    from livestack import Stack

#: Alerts about the monitoring itself: the fake worker is always up and always exports.
ABOUT_THE_MONITORING = frozenset({"CtxtraceTargetDown", "CtxtraceMetricsAbsent"})
# Inhibited by CtxtraceUnbalancedStack for the same app and worker (alertmanager.yml).
INHIBITED = {"CtxtraceContextsAccumulating", "CtxtraceLongLivedContext"}
BUCKETS = ("0.0001", "0.001", "0.01", "0.1", "1", "10", "60", "+Inf")
WORKER = "web-1:101:gunicorn"  # host:pid:role, as the agent names a worker
STARTED = time.time()


def exposition(scrape: int) -> str:
    """Contract metrics for one worker of app shop, a little worse on every scrape."""
    w1 = f'worker="{WORKER}"'
    base = f'app="shop",{w1}'
    lines = [
        f'ctxtrace_contexts_total{{kind="request",{base}}} {10 * scrape}',
        f'ctxtrace_contexts_total{{kind="app",{base}}} {10 * scrape}',
        f'ctxtrace_contexts_active{{kind="app",{base}}} {60 + scrape}',
        f'ctxtrace_contexts_active{{kind="request",{base}}} 2',
        f"ctxtrace_context_depth_max{{{w1}}} 3",
        f'ctxtrace_anomalies_total{{anomaly="leaked",kind="app",{base}}} {scrape}',
        f'ctxtrace_anomalies_total{{anomaly="long_lived",kind="app",{base}}} {scrape}',
        f'ctxtrace_out_of_context_access_total{{proxy="current_app",phase="import",'
        f'outcome="escaped",{w1}}} 1',
        f'ctxtrace_out_of_context_access_total{{proxy="g",phase="runtime",outcome="escaped",{w1}}}'
        f" {scrape}",
        f'ctxtrace_internal_errors_total{{component="metrics",{w1}}} {scrape}',
        f'ctxtrace_dropped_total{{what="context",{w1}}} {scrape}',
        f'ctxtrace_dropped_total{{what="log",{w1}}} {scrape}',
        'target_info{service_name="shop"} 1',
        # prometheus_client's process collector, as the agent serves it.
        f"process_start_time_seconds {STARTED:.2f}",
        f"process_resident_memory_bytes {50_000_000 + 1_000_000 * scrape}",
        f"process_cpu_seconds_total {0.1 * scrape:.1f}",
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


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., AbstractContextManager[Stack]]) -> Iterator[Stack]:
    """Fake worker w1 + webhook, Prometheus and Alertmanager (every `for` cut to 1 s),
    stopped after the module."""
    with start_stack("live-stack", "1s", worker=(WORKER, exposition)) as result:
        yield result


@pytest.fixture
def fault_alerts(alert_rules: list[dict[str, Any]]) -> set[str]:
    """Every shipped alert about the application's contexts."""
    return {rule["alert"] for rule in alert_rules} - ABOUT_THE_MONITORING


def test_every_alert_fires_with_real_data(
    livestack: ModuleType, stack: Stack, fault_alerts: set[str]
) -> None:
    """With `for` cut to 1 s, a worker that gets worse every scrape fires every alert."""
    livestack.wait_for(
        "all ctxtrace alerts to fire", lambda: stack.firing() >= fault_alerts, stack.logs
    )


def test_alertmanager_pages_critical_and_tickets_warnings(
    livestack: ModuleType, stack: Stack, fault_alerts: set[str]
) -> None:
    """critical reaches the pager webhook, warnings the ticket webhook, minus inhibited ones."""
    received = stack.recorder.received
    wanted_tickets = fault_alerts - INHIBITED - {"CtxtraceUnbalancedStack"}
    livestack.wait_for(
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
        assert sample["metric"]["worker"] == WORKER
        assert "exported_worker" not in sample["metric"]


def test_dashboard_queries_return_data(
    livestack: ModuleType, stack: Stack, dashboard: dict[str, Any]
) -> None:
    """Every panel query, with the variables filled in as Grafana would, returns series."""
    stack.query("up")  # fail early and clearly if Prometheus is not answering
    livestack.wait_for("two samples for rate()", lambda: stack.recorder.scrapes >= 4, stack.logs)
    values = {
        "__rate_interval": "1m", "__range": "1h", "app": "shop", "job": "ctxtrace",
        "host": "web-1", "worker": livestack.regex_value([WORKER]),
    }
    for where, target in livestack.dashboard_targets(dashboard):
        expr = livestack.substitute(target["expr"], values)
        assert stack.query(expr), f"{where} returned nothing: {expr}"


def test_dashboard_variables_list_the_worker(
    livestack: ModuleType, stack: Stack, dashboard: dict[str, Any]
) -> None:
    """The job, host, app and worker variables' label_values() queries find the fake worker."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name, value, values in (
        ("job", "ctxtrace", {}),
        ("host", WORKER, {"job": "ctxtrace"}),  # the variable's regex then keeps web-1
        ("app", "shop", {"job": "ctxtrace"}),
        ("worker", WORKER, {"job": "ctxtrace", "host": "web-1"}),
    ):
        query = livestack.substitute(variables[name]["query"], values)
        selector, label = livestack.label_values_query(query)
        assert stack.label_values(label, selector) == [value]
