"""The OTLP route end to end: real worker processes push to a real OTLP/HTTP receiver.

No OpenTelemetry Collector can run here, so the receiver stands in for the ``otlp``
receiver of exporters/otel-collector.yaml (its ``http`` protocol: protobuf posted to
``/v1/metrics`` and ``/v1/traces``), and decodes with opentelemetry-proto what a
Collector would get. The workers are configured as docs/deploying.md says:
``CTXTRACE_METRICS=otlp``, ``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` and ``OTEL_EXPORTER_OTLP_ENDPOINT``.

Every server listens on 127.0.0.1 on a free port and is stopped by its pid; every wait
and every loop is bounded.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from rq import Queue

from ctxtrace.telemetry.spans import RECHECK_S

from .._otlp import Point, Receiver, attributes
from .._servers import BIN, ctxtrace_gunicorn, ctxtrace_run, redis_server, stop, wait_until
from ..fixtures.rq_jobs import RQ_JOBS, enqueue_all

SERVICE = "shop-api"
#: Milliseconds between pushes: several during a run, so cumulative points can be compared.
EXPORT_INTERVAL_MS = 300
#: Requests sent: healthy ones, then ones that pop a context twice (a seeded double_pop).
HEALTHY = 30
DOUBLE_POPS = 6
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def otlp_env(url: str) -> dict[str, str]:
    """What a worker needs to push spans and metrics to an OTLP/HTTP endpoint at ``url``."""
    return {
        "CTXTRACE_METRICS": "otlp",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": url,
        "OTEL_SERVICE_NAME": SERVICE,
        "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS),
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def by_process(points: list[Point], name: str) -> dict[str, dict[tuple[Any, ...], Any]]:
    """The last data point of each series of ``name``, by the process that pushed it
    (``service.instance.id``). Points are cumulative: the last one is the process's total."""
    found: dict[str, dict[tuple[Any, ...], Any]] = defaultdict(dict)
    for resource, metric, point in points:
        if metric.name == name:
            key = tuple(sorted(attributes(point.attributes).items()))
            found[resource["service.instance.id"]][key] = point
    return found


def total(series: dict[tuple[Any, ...], Any], field: str = "as_int", **labels: str) -> int:
    """The sum of ``field`` over the series whose attributes include ``labels``."""
    wanted = labels.items()
    return sum(getattr(p, field) for key, p in series.items() if wanted <= dict(key).items())


def assert_cumulative(points: list[Point]) -> None:
    """Every sum and histogram is cumulative: each series keeps its start time from push
    to push, and its value never goes down."""
    seen: dict[tuple[Any, ...], tuple[int, int]] = {}
    for resource, metric, point in points:
        kind = metric.WhichOneof("data")
        if kind not in ("sum", "histogram"):
            continue  # gauges (the deepest stack) have no temporality
        assert getattr(metric, kind).aggregation_temporality == CUMULATIVE, metric.name
        if kind == "sum" and not metric.sum.is_monotonic:
            # Only the active contexts may go down: an up-down counter.
            assert metric.name == "ctxtrace.contexts.active"
            continue
        key = (
            resource["service.instance.id"], metric.name,
            tuple(sorted(attributes(point.attributes).items())),
        )
        value = point.count if kind == "histogram" else point.as_int
        if key in seen:
            start, before = seen[key]
            assert point.start_time_unix_nano == start, key
            assert value >= before, key
        seen[key] = (point.start_time_unix_nano, value)


@dataclass
class Run:
    """What one gunicorn run sent, and what the receiver got from it."""

    master: int
    healthy: Counter[int]
    faults: Counter[int]
    points: list[Point]
    spans: list[Any]

    def processes(self, name: str) -> dict[str, dict[tuple[Any, ...], Any]]:
        return by_process(self.points, name)

    def master_id(self) -> str:
        """The master's ``service.instance.id`` (its role as it started, see the xfail)."""
        (found,) = [w for w in self.processes("ctxtrace.contexts") if pid_of(w) == self.master]
        return found

    def workers(self) -> dict[int, str]:
        """The workers' ``service.instance.id``, by pid."""
        return {
            pid_of(w): w for w in self.processes("ctxtrace.contexts") if pid_of(w) != self.master
        }


def pid_of(worker: str) -> int:
    """The pid of a ``host:pid:role`` worker id."""
    return int(worker.split(":")[1])


@pytest.fixture(scope="module")
def gunicorn_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Two gthread workers under ``ctxtrace run -- gunicorn --preload`` push to the
    receiver: HEALTHY requests and DOUBLE_POPS seeded faults, then SIGTERM, to the end."""
    receiver = Receiver()
    healthy: Counter[int] = Counter()
    faults: Counter[int] = Counter()
    try:
        process, base, _targets, log = ctxtrace_gunicorn(
            tmp_path_factory.mktemp("otlp-gunicorn"), "tests.fixtures.telemetry_app:app",
            "-w", "2", "-k", "gthread", "--threads", "4", env=otlp_env(receiver.url),
        )
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    pytest.fail(f"gunicorn exited: {log.read_text()[-2000:]}", pytrace=False)
                try:
                    healthy[int(_get(f"{base}/pid"))] += 1
                except OSError:
                    return False
                return True

            wait_until(ready, timeout=30, interval=0.2, what="gunicorn answering")
            # A forked worker builds its own span exporter RECHECK_S after the fork
            # (spans of anomalies before that are not exported): wait until both workers
            # have pushed metrics, then for that long.
            wait_until(
                lambda: len({p.resource["service.instance.id"] for p in receiver.points()}) >= 3,
                timeout=10, what="both workers' and the master's first pushes",
            )
            time.sleep(RECHECK_S + 0.5)
            for _ in range(HEALTHY - 1):
                healthy[int(_get(f"{base}/pid"))] += 1
            for _ in range(DOUBLE_POPS):
                faults[int(_get(f"{base}/double-pop"))] += 1
            # Pushes while they run too, so that cumulative points can be compared.
            wait_until(
                lambda: len(receiver.metrics) >= 6, timeout=10, what="pushes during the run"
            )
        finally:
            stop(process, grace=20, group=True)
        assert process.returncode == 0, log.read_text()[-3000:]
        return Run(process.pid, healthy, faults, list(receiver.points()), receiver.spans())
    finally:
        receiver.close()


def test_each_worker_pushes_under_its_own_identity(gunicorn_run: Run) -> None:
    """Each worker's resource has ``service.instance.id`` = its ``worker`` (host:pid:gunicorn)
    and the service name; every point it pushed carries that same ``worker``."""
    workers = gunicorn_run.workers()
    assert len(workers) == 2
    assert set(gunicorn_run.healthy) | set(gunicorn_run.faults) <= set(workers)
    for resource, metric, point in gunicorn_run.points:
        assert resource["service.name"] == SERVICE
        worker = resource["service.instance.id"]
        if pid_of(worker) != gunicorn_run.master:
            assert worker == workers[pid_of(worker)]
            assert worker.endswith(f":{pid_of(worker)}:gunicorn")
            assert attributes(point.attributes).get("worker", worker) == worker, metric.name


def test_the_master_pushes_under_the_worker_label_of_its_points(gunicorn_run: Run) -> None:
    """The --preload master's resource names it as its points do: host:pid:gunicorn-master,
    and nothing went out under the name it started with (host:pid:process)."""
    master = gunicorn_run.master_id()
    names = {
        resource["service.instance.id"]
        for resource, _, _ in gunicorn_run.points
        if pid_of(resource["service.instance.id"]) == gunicorn_run.master
    }
    assert names == {master}
    labels = {
        attributes(point.attributes).get("worker")
        for resource, _, point in gunicorn_run.points
        if resource["service.instance.id"] == master
    } - {None}
    assert labels == {master}
    assert master.endswith(f":{gunicorn_run.master}:gunicorn-master")


def test_sums_and_histograms_are_cumulative(gunicorn_run: Run) -> None:
    """The SDK's default temporality, which ctxtrace leaves alone: each push holds the
    totals since the process started (what the Collector's prometheus exporter expects)."""
    assert_cumulative(gunicorn_run.points)


def test_counts_are_exact_after_the_workers_exit(gunicorn_run: Run) -> None:
    """The last points of each worker are exactly the requests and faults it served, and
    summed over the workers exactly what was sent; the master counts its import alone."""
    contexts = gunicorn_run.processes("ctxtrace.contexts")
    anomalies = gunicorn_run.processes("ctxtrace.anomalies")
    durations = gunicorn_run.processes("ctxtrace.context.duration")
    healthy, faults = gunicorn_run.healthy, gunicorn_run.faults
    workers = gunicorn_run.workers()
    for pid, worker in workers.items():
        requests = healthy[pid] + faults[pid]
        assert total(contexts[worker], kind="request") == requests
        assert total(durations[worker], "count", kind="request") == requests
        # Flask's own app context per request, plus the one each fault pushes itself.
        assert total(contexts[worker], kind="app") == requests + faults[pid]
        assert total(anomalies[worker]) == faults[pid]
        assert total(anomalies[worker], anomaly="double_pop", kind="app") == faults[pid]
    assert sum(total(contexts[w], kind="request") for w in workers.values()) == (
        HEALTHY + DOUBLE_POPS
    )
    assert sum(total(anomalies[w]) for w in workers.values()) == DOUBLE_POPS
    master = gunicorn_run.master_id()
    assert total(contexts[master], kind="app") == 1
    assert total(contexts[master], kind="request") == 0


def test_each_fault_is_one_span_from_its_worker(gunicorn_run: Run) -> None:
    """CTXTRACE_SPANS=anomalies (the default): one span per seeded fault, no other, each
    from the worker that served it."""
    by_pid = Counter(
        pid_of(attributes(resource.attributes)["service.instance.id"])
        for resource, span in gunicorn_run.spans
        if [event.name for event in span.events] == ["ctxtrace.double_pop"]
    )
    assert by_pid == gunicorn_run.faults
    assert len(gunicorn_run.spans) == DOUBLE_POPS


# -- RQ: work-horses that leave with os._exit ---------------------------------------

RQ_TIMEOUT_S = 60.0


@dataclass
class RqRun:
    """What one burst of ``rq worker`` pushed: the worker's own pid and what arrived."""

    worker: int
    points: list[Point]
    spans: list[Any]

    def horses(self) -> dict[str, tuple[int, int, int]]:
        """What each work-horse counted, by its ``service.instance.id``."""
        contexts = by_process(self.points, "ctxtrace.contexts")
        anomalies = by_process(self.points, "ctxtrace.anomalies")
        accesses = by_process(self.points, "ctxtrace.out_of_context_access")
        # A horse whose job pushed no context has no contexts series: its accesses name it.
        return {
            horse: (
                total(contexts.get(horse, {}), kind="app"),
                total(anomalies.get(horse, {}), anomaly="leaked"),
                total(accesses.get(horse, {}), phase="runtime", outcome="escaped"),
            )
            for horse in contexts.keys() | accesses.keys()
            if pid_of(horse) != self.worker
        }


@pytest.fixture(scope="module")
def rq_run(tmp_path_factory: pytest.TempPathFactory) -> RqRun:
    """``ctxtrace run -- rq worker --burst`` (RQ's default, forking worker) over the jobs of
    RQ_JOBS on a real Redis, pushing to the receiver; run to its end."""
    tmp = tmp_path_factory.mktemp("otlp-rq")
    receiver = Receiver()
    try:
        with redis_server(tmp) as url:
            connection = redis.Redis.from_url(url)
            try:
                enqueue_all(Queue("ctxtrace-otlp", connection=connection))
            finally:
                connection.close()
            log = tmp / "rq.log"
            process = ctxtrace_run(
                [str(BIN / "rq"), "worker", "--burst", "--url", url, "ctxtrace-otlp"],
                log, env=otlp_env(receiver.url),
            )
            try:
                status = process.wait(RQ_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rq worker still running after {RQ_TIMEOUT_S:g} s", pytrace=False)
            finally:
                stop(process, group=True)
            assert status == 0, log.read_text(errors="replace")[-3000:]
        return RqRun(process.pid, list(receiver.points()), receiver.spans())
    finally:
        receiver.close()


#: Why a horse's spans are lost today (ctxtrace/telemetry/spans.py, not fixed here). Its
#: metrics are not: a flush builds the MeterProvider a forked process has not built yet.
def test_rq_horses_push_exact_counts_under_their_own_identity(rq_run: RqRun) -> None:
    """Each job's work-horse pushes before its os._exit, as a process of its own (role
    rq), cumulative, with exactly what its one job did; so summed, exactly the jobs sent."""
    horses = rq_run.horses()
    assert all(horse.endswith(":rq") for horse in horses)
    expected = sorted(counts for count, counts in RQ_JOBS.values() for _ in range(count))
    assert sorted(horses.values()) == expected
    assert_cumulative(rq_run.points)
    for resource, metric, point in rq_run.points:
        worker = resource["service.instance.id"]
        assert attributes(point.attributes).get("worker", worker) == worker, metric.name


def test_rq_horses_export_their_anomaly_spans(rq_run: RqRun) -> None:
    """Each leak and each escaped access in a horse is a span, pushed before the horse exits:
    a forked process builds its own provider at its first span, not a second later."""
    horses = [
        worker
        for resource, _span in rq_run.spans
        if pid_of(worker := attributes(resource.attributes)["service.instance.id"])
        != rq_run.worker
    ]
    leaks, accesses = (sum(counts[n] * count for count, counts in RQ_JOBS.values()) for n in (1, 2))
    assert len(horses) == len(rq_run.spans) == leaks + accesses
