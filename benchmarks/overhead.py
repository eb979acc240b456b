"""What ctxtrace costs, next to bare Flask and the tools people use instead (issue 14's budgets).

Run ``python benchmarks/overhead.py`` (about ten minutes on a 2-core machine); it
rewrites ``docs/performance.md``. ``--smoke`` runs every part briefly and writes
the table only where ``--out`` says (CI runs it so the benchmark cannot rot; it
asserts nothing about timings).

Four parts, each measured the way its noise allows:

- **Per-operation timings.** Every (configuration, workload) cell in a fresh
  process, all cells interleaved in each of ``--rounds`` rounds; each sample is
  the best of three batches of ``--loops`` calls. Medians with min-max, and the
  ratio to bare Flask from the same run. ``--clock cpu`` times with the
  process's CPU time (every thread's: ctxtrace's metrics drain thread and the
  SDK's export threads count too) instead of the wall clock.
- **Real server.** gunicorn with 2 sync workers on loopback, loaded for a fixed
  time (and at most a fixed number of requests) by a threaded HTTP client of our
  own in a second process; requests per second and p99 latency, bare and
  ctxtrace interleaved over the rounds.
- **Instructions.** ``valgrind --tool=callgrind`` counts the instructions of the
  trivial request loop (through ``app(...)`` and ``app.wsgi_app(...)``), a
  push/pop pair, a proxy access and a repeated failed access, bare and with
  ctxtrace, and the request also with ``spans=all`` and with OpenTelemetry's
  Flask instrumentation; and a whole HTTP request in a gunicorn sync worker,
  bare and with ctxtrace (``/mark`` requests call ``os.getsid``, the marker
  there, as the worker calls ``getppid`` itself). One process per
  configuration runs each loop twice, a short and a long run, with
  ``os.getppid()`` between them as the marker callgrind dumps its counts at
  (``--dump-before=getppid``); the difference of the two runs divided by the
  difference of calls is the cost of one call, start-up and warm-up cancel out
  (the start-up heap is frozen out of the garbage collector's way first). Only
  the main thread is counted: the request path, whose count repeats run to run
  (to within a few hundred instructions: addresses feed some hashes), where
  wall-clock time on a shared machine does not. Background threads wake by the
  clock, which valgrind slows fifty-fold; their work shows in ``--clock cpu``.
- **Memory.** ``benchmarks/soak.py`` (10^6 app contexts, 1 % leaked, a ledger
  cap of 1,000) in a process of its own: resident memory and tracked contexts
  as the run goes, which must stay flat once the cap is reached.

Every configuration, bare Flask included, runs with global OpenTelemetry SDK
providers installed as a production app has them: a TracerProvider exporting
through a BatchSpanProcessor and a MeterProvider with a periodic reader (OTel's
default interval), both into exporters that drop the data, so the export
itself is not measured and the comparison is fair (the providers cost nothing
while unused). With a MeterProvider set, ctxtrace's default metrics use it and
open no port. ``CTXTRACE_*`` and ``OTEL_*`` variables are removed from every
child's environment, so "default" means the defaults.

- ``bare``: Flask alone.
- ``ctxtrace``: ``ctxtrace.instrument()`` with every default (spans only for
  anomalies, metrics through the app's MeterProvider).
- ``spans_all``: ``CTXTRACE_SPANS=all``, the SDK sampling everything.
- ``all_options``: every detector, the flight record, ``repair``, ``long_lived``
  for app and streaming contexts, a suppression list.
- ``otel``/``otel_unsampled``: OpenTelemetry's Flask instrumentation, sampler
  always on / always off.
- ``otel_ctxtrace``: OpenTelemetry's Flask instrumentation (sampled) and ctxtrace.
- ``sentry``: sentry-sdk's Flask integration, ``traces_sample_rate=1.0``, a
  transport that drops envelopes. It hooks ``Flask.__call__``, so it is measured
  only through ``app(...)``, the WSGI callable a server calls.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"
SOAK = HERE / "soak.py"

CONFIGS: dict[str, str] = {
    "bare": "Flask alone",
    "ctxtrace": "ctxtrace defaults",
    "spans_all": "ctxtrace spans=all, sampled 100 %",
    "all_options": "ctxtrace, every option on",
    "otel": "OpenTelemetry Flask instrumentation, sampled",
    "otel_unsampled": "OpenTelemetry Flask instrumentation, sampler off",
    "otel_ctxtrace": "OpenTelemetry Flask instrumentation (sampled) + ctxtrace",
    "sentry": "sentry-sdk Flask integration, traces 1.0, envelopes dropped",
}
WORKLOADS: dict[str, str] = {
    "request": "trivial view through the WSGI callable, app(environ, start_response)",
    "wsgi_app": "trivial view through app.wsgi_app(environ, start_response)",
    "request_g_url_for": "a view that sets g and calls url_for, through app(...)",
    "push_pop": "with app.app_context(): pass",
    "proxy_access": "current_app.name, an app context pushed",
    "failed_access": "current_app.name with no context (RuntimeError caught)",
}
REQUEST_WORKLOADS = ("request", "wsgi_app", "request_g_url_for")
# The context workloads run only where something hooks contexts (OpenTelemetry's and
# Sentry's instrumentation leave pushes and proxies untouched).
CONTEXT_CONFIGS = ("bare", "ctxtrace", "spans_all", "all_options")
# Sentry's tracing runs in Flask.__call__: through app.wsgi_app it would measure nothing.
CALLABLE_ONLY = ("sentry",)
REQUEST_LOOPS_DIVISOR = 5
# What each configuration needs installed beyond ctxtrace's test extra.
NEEDS: dict[str, str] = {"sentry": "sentry_sdk"}
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without ctxtrace's and OpenTelemetry's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env.update(extra)
    return env


# -- one configuration in one process -------------------------------------------------


def _sdk_providers(sampled: bool) -> None:
    """Global SDK providers as a production app has them, exporting into nothing."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class DroppedSpans(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class DroppedMetrics(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kw: Any) -> Any:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kw: Any) -> None:
            return None

    tracer_provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    tracer_provider.add_span_processor(BatchSpanProcessor(DroppedSpans()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(DroppedMetrics())
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def _ctxtrace(**options: Any) -> None:
    import structlog

    import ctxtrace

    if not ctxtrace.instrument(**options):
        raise SystemExit("ctxtrace did not turn on")
    # No anomaly is expected; should one come, its line must not disturb the timing.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())


def _sentry() -> None:
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.transport import Transport

    class Dropped(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            return None

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        integrations=[FlaskIntegration()],
        traces_sample_rate=1.0,
        transport=Dropped,
        default_integrations=False,
    )


def configure(config: str) -> Callable[[Any], None]:
    """Set up ``config`` in this process; returns what to do to each app made after."""
    _sdk_providers(sampled=config != "otel_unsampled")
    if config in ("ctxtrace", "otel_ctxtrace"):
        _ctxtrace()
    elif config == "spans_all":
        _ctxtrace(spans="all")
    elif config == "all_options":
        _ctxtrace(
            repair=True, long_lived_app=30, long_lived_streaming=True, flight_record=16,
            suppress="some.vendored.module,vendor/thing.py:12",
        )
    elif config == "sentry":
        _sentry()
    if config in ("otel", "otel_unsampled", "otel_ctxtrace"):
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        return lambda app: FlaskInstrumentor().instrument_app(app)
    return lambda app: None


def make_app() -> Any:
    from flask import Flask, g, url_for

    app = Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    @app.route("/page")
    def page() -> str:
        g.user = "u1"
        return url_for("index")

    return app


def configured_app(config: str) -> Any:
    hook = configure(config)
    app = make_app()
    hook(app)
    return app


def server_app() -> Any:
    """What each gunicorn worker serves: ``gunicorn 'overhead:server_app()'``."""
    return configured_app(os.environ["OVERHEAD_BENCH_CONFIG"])


def marked_server_app() -> Any:
    """``server_app`` with ``/mark``: its ``os.getsid`` call is where callgrind dumps its
    counts (``--dump-before=getsid``) in a gunicorn worker, which calls ``getppid`` itself."""
    app = server_app()
    app.add_url_rule("/mark", "mark", _mark)
    return app


def _mark() -> str:
    os.getsid(0)
    return ""


def workload(name: str, app: Any) -> Callable[[], object]:
    from flask import current_app
    from werkzeug.test import EnvironBuilder

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    if name in REQUEST_WORKLOADS:
        environ = EnvironBuilder(path="/page" if name == "request_g_url_for" else "/").get_environ()
        call = app.wsgi_app if name == "wsgi_app" else app

        def request() -> None:
            for _ in call(dict(environ), start_response):
                pass

        return request
    if name == "push_pop":

        def push_pop() -> None:
            with app.app_context():
                pass

        return push_pop
    if name == "proxy_access":
        app.app_context().push()
        return lambda: current_app.name
    if name == "failed_access":

        def failed() -> None:
            try:  # noqa: SIM105 - contextlib.suppress would add its own cost
                current_app.name  # noqa: B018 - the failing lookup is the point
            except RuntimeError:
                pass

        return failed
    raise SystemExit(f"unknown workload {name}")


def time_loop(body: Callable[[], object], loops: int, clock: Callable[[], int]) -> float:
    """Nanoseconds per call of ``body``, best of three batches (the least disturbed)."""
    best = float("inf")
    for _ in range(3):
        start = clock()
        for _ in range(loops):
            body()
        best = min(best, (clock() - start) / loops)
    return best


def timing_worker(config: str, name: str, loops: int, clock: str) -> None:
    body = workload(name, configured_app(config))
    for _ in range(min(loops, 2000)):
        body()
    print(json.dumps({"ns": time_loop(body, loops, CLOCKS[clock])}))


def callgrind_worker(config: str, plan: str) -> None:
    """Run each ``workload:short:long`` of ``plan``, ``os.getppid()`` around each run."""
    app = configured_app(config)
    for item in plan.split(","):
        name, short, long = item.split(":")
        body = workload(name, app)
        for _ in range(int(short)):
            body()
        # The start-up heap out of the collector's way: a full collection over it
        # would land in one run or the other, by chance.
        gc.collect()
        gc.freeze()
        for calls in (int(short), int(long)):
            os.getppid()
            for _ in range(calls):
                body()
    os.getppid()


# -- the load client (its own process) ----------------------------------------------


def load_worker(port: int, seconds: float, threads: int, limit: int) -> None:
    """GET / as fast as ``threads`` threads can for ``seconds`` (at most ``limit`` in all)."""

    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    deadline = time.perf_counter() + seconds
    budget = threading.Semaphore(limit)

    def run(index: int) -> None:
        mine = latencies[index]
        while time.perf_counter() < deadline and budget.acquire(blocking=False):
            start = time.perf_counter()
            try:
                # gunicorn's sync workers close every connection after one response.
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                connection.close()
                ok = response.status == 200
            except OSError:
                ok = False
            if ok:
                mine.append(time.perf_counter() - start)
            else:
                errors[index] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    done = sorted(x for per_thread in latencies for x in per_thread)
    p99 = done[min(len(done) - 1, int(len(done) * 0.99))] if done else float("nan")
    print(json.dumps({
        "rps": len(done) / elapsed, "p99_ms": p99 * 1000, "errors": sum(errors),
        "requests": len(done),
    }))


# -- the parts, run from the parent ---------------------------------------------------


def available(config: str) -> bool:
    module = NEEDS.get(config)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Cell:
    config: str
    workload: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def timings(
    configs: list[str], rounds: int, loops: int, clock: str, parallel: int = 1
) -> list[Cell]:
    """Every cell once per round, in a fresh process, all cells interleaved.

    ``parallel`` runs that many cells at once: only for the smoke, whose numbers
    mean nothing; a measurement runs one at a time.
    """
    plan: list[tuple[str, str, int]] = []
    for name in WORKLOADS:
        for config in configs:
            if name in REQUEST_WORKLOADS:
                if name == "wsgi_app" and config in CALLABLE_ONLY:
                    continue
                # A request costs 20-700 us, a context operation 1-40 us: fewer calls.
                plan.append((config, name, max(1, loops // REQUEST_LOOPS_DIVISOR)))
            elif config in CONTEXT_CONFIGS:
                plan.append((config, name, loops))
    samples: dict[tuple[str, str], list[float]] = {}
    env = child_env()

    def sample(cell: tuple[str, str, int]) -> float:
        config, name, calls = cell
        out = subprocess.run(
            [sys.executable, __file__, "--worker", config, name, str(calls), clock],
            check=True, capture_output=True, text=True, env=env,
        ).stdout
        return float(json.loads(out)["ns"])

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        for _ in range(rounds):
            for (config, name, _calls), ns in zip(plan, pool.map(sample, plan), strict=True):
                samples.setdefault((config, name), []).append(ns)
    return [Cell(c, w, tuple(v)) for (c, w), v in samples.items()]


@dataclass(frozen=True)
class ServerRun:
    config: str
    rps: tuple[float, ...]
    p99_ms: tuple[float, ...]
    #: The workers' CPU time per request, in microseconds.
    cpu_us: tuple[float, ...]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not listen on {port} within {timeout} s")


def _children_cpu_s(parent: int) -> float:
    """User plus system CPU seconds of ``parent``'s child processes so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                # The command name may hold spaces: the fields after it are split.
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # After the name: state, ppid (index 1), ..., utime (11), stime (12).
        if int(fields[1]) == parent:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def server_round(config: str, seconds: float, threads: int) -> dict[str, float]:
    """One gunicorn run: start 2 workers, warm up, load, stop.

    Beside requests per second, the workers' own CPU time per request (their
    background threads included): what the server spends on each request. On a
    2-core machine shared with the load client both move by about 10 % from run
    to run, so neither resolves a 2 % difference; the instruction counts do.
    """
    port = _free_port()
    # This folder first, so gunicorn imports this module; the caller's path after it.
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = child_env(OVERHEAD_BENCH_CONFIG=config, PYTHONPATH=path)
    # No --preload: each worker sets its configuration up as it loads the app.
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
            "--no-control-socket", "--log-level", "warning", "overhead:server_app()",
        ],
        env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(port, 20)
        client = [sys.executable, __file__, "--load-worker", str(port)]
        # A short warm-up, then the measured run; both bounded in time and count.
        subprocess.run([*client, "0.5", str(threads), "100000"], check=True, capture_output=True)
        cpu_before = _children_cpu_s(server.pid)
        out = subprocess.run(
            [*client, str(seconds), str(threads), "1000000"],
            check=True, capture_output=True, text=True,
        ).stdout
        cpu = _children_cpu_s(server.pid) - cpu_before
        result = dict(json.loads(out))
        result["cpu_us"] = cpu * 1e6 / max(1, result["requests"])
        return result
    finally:
        _stop(server, 10)


def _stop(server: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM (gunicorn's graceful stop), then SIGKILL after ``grace`` seconds."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()


def server_runs(rounds: int, seconds: float, threads: int) -> list[ServerRun]:
    try:
        __import__("gunicorn")
    except ImportError:
        return []
    results: dict[str, list[dict[str, float]]] = {"bare": [], "ctxtrace": []}
    for _ in range(rounds):
        for config, runs in results.items():
            runs.append(server_round(config, seconds, threads))
    return [
        ServerRun(
            c,
            tuple(r["rps"] for r in runs),
            tuple(r["p99_ms"] for r in runs),
            tuple(r["cpu_us"] for r in runs),
        )
        for c, runs in results.items()
    ]


# Calls per callgrind run, short and long, by workload.
CALLGRIND_CALLS: dict[str, tuple[int, int]] = {
    "request": (200, 1200),
    "wsgi_app": (200, 1200),
    "push_pop": (2000, 12000),
    "proxy_access": (5000, 30000),
    "failed_access": (500, 3000),
}
#: Counted for every workload; the request also with these (the spans=all budget).
CALLGRIND_CONFIGS = ("bare", "ctxtrace")
CALLGRIND_REQUEST_CONFIGS = ("spans_all", "otel")
CALLGRIND_SMOKE_DIVISOR = 40
#: Processes per cell, their median reported: a process's count moves by about 2,000
#: instructions with where its heap and stack land (addresses feed hashes), so each
#: replica gets an environment of a different size, which moves them.
CALLGRIND_REPLICAS = 3
#: What the smoke counts: one workload, so that its two valgrind processes start at once.
CALLGRIND_SMOKE_WORKLOADS = ("wsgi_app",)
#: Instructions per call before the hot-path work of issue 14 (commit 730b153, measured
#: 2026-12-03 on the machine docs/performance.md names): the budget table's "before".
BEFORE_ISSUE_14: dict[str, dict[str, float]] = {
    "request": {"bare": 319_169, "ctxtrace": 345_565, "spans_all": 944_560, "otel": 1_543_299},
    "wsgi_app": {"bare": 318_101, "ctxtrace": 341_063},
    "push_pop": {"bare": 24_337, "ctxtrace": 51_384},
    "failed_access": {"bare": 13_628, "ctxtrace": 336_360},
}


def instructions(smoke: bool = False) -> dict[str, dict[str, float]]:
    """Instructions per call by workload and configuration, from callgrind (if installed).

    Each (configuration, workload) in a process of its own, like the timings: in
    one process, a workload run after another inherited its state (a duration
    buffer the metrics thread was still draining) and counted 30 % more. Instruction
    counts do not depend on what else the machine runs, so two processes run at once.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {}
    divisor = CALLGRIND_SMOKE_DIVISOR if smoke else 1
    names = CALLGRIND_SMOKE_WORKLOADS if smoke else tuple(CALLGRIND_CALLS)
    replicas = 1 if smoke else CALLGRIND_REPLICAS
    cells = [(name, config) for name in names for config in CALLGRIND_CONFIGS]
    if not smoke:
        cells += [("request", c) for c in CALLGRIND_REQUEST_CONFIGS if available(c)]
    runs = [(name, config, replica) for name, config in cells for replica in range(replicas)]
    counted: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in (runs[i : i + 2] for i in range(0, len(runs), 2)):
            started = {}
            for name, config, replica in pair:
                short, long = (n // divisor for n in CALLGRIND_CALLS[name])
                out = f"{tmp}/{name}-{config}-{replica}.out"
                started[(name, config, out)] = (short, long), subprocess.Popen(
                    [
                        valgrind, "--tool=callgrind", "--dump-before=getppid",
                        "--separate-threads=yes", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--callgrind-worker", config,
                        f"{name}:{short}:{long}",
                    ],
                    env=child_env(PYTHONHASHSEED="0", OVERHEAD_PAD="x" * 64 * replica),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
            for (name, config, out), ((short, long), run) in started.items():
                _, stderr = run.communicate()
                if run.returncode != 0:
                    raise RuntimeError(f"callgrind run of {config} failed:\n{stderr[-2000:]}")
                # One dump per marker, numbered, of the main thread (file suffix -01);
                # the last two are the short and the long run.
                dumps = sorted(
                    Path(out).parent.glob(f"{Path(out).name}.*-01"),
                    key=lambda p: int(p.name.rsplit(".", 1)[1].split("-")[0]),
                )[-2:]
                totals = [_callgrind_total(p) for p in dumps]
                counted.setdefault((name, config), []).append(
                    (totals[1] - totals[0]) / (long - short)
                )
    per_call: dict[str, dict[str, float]] = {name: {} for name in names}
    for (name, config), values in counted.items():
        per_call[name][config] = statistics.median(values)
    if importlib.util.find_spec("gunicorn") is not None:
        per_call["gunicorn"] = server_instructions(valgrind, smoke, replicas)
    return per_call


#: Requests per callgrind run of a gunicorn worker, short and long.
SERVER_CALLGRIND_CALLS = (100, 500)


def server_instructions(valgrind: str, smoke: bool, replicas: int) -> dict[str, float]:
    """Instructions per request in a gunicorn sync worker under callgrind, bare and ctxtrace.

    The budget's server figure that noise cannot move: requests per second and the
    workers' CPU time move by 10 % from run to run here. One worker, requests one
    at a time from this process; ``/mark`` between a short and a long run makes
    callgrind dump, and the difference of the two runs divided by the difference
    of requests is one request (HTTP parsing and all). Replicas run two at a time.
    """
    divisor = CALLGRIND_SMOKE_DIVISOR // 4 if smoke else 1
    short, long = (n // divisor for n in SERVER_CALLGRIND_CALLS)
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    runs = [(config, r) for r in range(replicas) for config in CALLGRIND_CONFIGS]
    counted: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in (runs[i : i + 2] for i in range(0, len(runs), 2)):
            with concurrent.futures.ThreadPoolExecutor(len(pair)) as pool:
                futures = {
                    config: pool.submit(
                        _server_callgrind_run, valgrind, config, f"{tmp}/{config}-{r}", path,
                        short, long,
                    )
                    for config, r in pair
                }
            for config, future in futures.items():
                counted.setdefault(config, []).append(future.result())
    return {config: statistics.median(values) for config, values in counted.items()}


def _server_callgrind_run(
    valgrind: str, config: str, out: str, path: str, short: int, long: int
) -> float:
    port = _free_port()
    server = subprocess.Popen(
        [
            valgrind, "--tool=callgrind", "--dump-before=getsid", "--separate-threads=yes",
            f"--callgrind-out-file={out}.%p", sys.executable, "-m", "gunicorn", "--workers",
            "1", "--bind", f"127.0.0.1:{port}", "--no-control-socket", "--log-level",
            "warning", "--timeout", "300", "overhead:marked_server_app()",
        ],
        env=child_env(OVERHEAD_BENCH_CONFIG=config, PYTHONPATH=path, PYTHONHASHSEED="0"),
        cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(port, 300)
        for count in (short // 2, 1, short, 1, long, 1):
            target = "/mark" if count == 1 else "/"
            for _ in range(count):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("GET", target)
                connection.getresponse().read()
                connection.close()
    finally:
        _stop(server, 60)
    # The worker's main thread: dumps numbered 1 (after the warm-up), 2 (the short
    # run) and 3 (the long run), then one at exit.
    dumps = {
        int(p.name.rsplit(".", 1)[1].split("-")[0]): p
        for p in Path(out).parent.glob(f"{Path(out).name}.*.*-01")
    }
    if not {2, 3} <= dumps.keys():
        raise RuntimeError(f"callgrind run of gunicorn ({config}) made no marked dumps")
    return (_callgrind_total(dumps[3]) - _callgrind_total(dumps[2])) / (long - short)


def _callgrind_total(dump: Path) -> int:
    found = re.search(r"^totals: (\d+)", dump.read_text(), re.M)
    if found is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(found.group(1))


def memory(contexts: int, cap: int, smoke: bool) -> dict[str, Any]:
    """``benchmarks/soak.py`` with ``contexts`` contexts and ``cap``, as JSON."""
    command = [
        sys.executable, str(SOAK), "--json", "--contexts", str(contexts), "--cap", str(cap),
        "--sample-every", str(contexts // 100),
    ]
    if smoke:
        command += ["--sweep-every", str(contexts // 4), "--thread-leaks", "10"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), check=False)
    if not done.stdout:
        raise RuntimeError(f"soak.py failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the report ---------------------------------------------------------------------

HOT_PATH_NOTES = """
## What the request path does

- The contexts Flask pushes to dispatch a request (the request context and, on
  Flask <= 3.1, the app context it pushes for itself) get no ledger record: they
  are counted and timed on the request's unit of work, and one flight-record
  entry per request tells their story. A pop is healthy when Flask's own top of
  stack, read before the pop, is the context being popped; only other pops go
  through the ledger. The moment the stack can go wrong around them (a context
  pushed above them, a pop of anything but the top, the request ending with
  them still pushed) they get full records at their place in the mirror stack,
  and every rule applies to them as to any other context. `log_lifecycle` keeps
  full records from the push; `spans=all` does not: the request is one span,
  made when it ends from what its unit holds (its push time, its endpoint and
  the trace current at its dispatch), with four attributes.
- A failed proxy lookup at a site reported in the current window (the log rate
  window) skips the flight record, the trace context, the event, the span and
  the line: it is counted, and its outcome (handled or escaped) judged from the
  error's traceback when the error has been caught. Outside any unit of work
  that is at the thread's next failed lookup, unless the error is still being
  handled then (it then waits for the sweep): a hot fallback loop holds one
  error and its frames. Before, such accesses waited in a queue of up to 1,024
  for the sweep, and a hot loop settled the oldest inline on every access;
  holding a thousand errors alone cost about 3,000 instructions per access in
  garbage collection (measured with the queue cut to 16).
- Proxies: a successful `current_app`/`g`/`request` lookup runs werkzeug's own
  code object; only the name `RuntimeError` in it is bound to a function that
  records the failure and builds the same error.
- Pushes by user code are tracked with their line: code objects are classified
  once, sites cached per code object and instruction offset.
- `Flask.__call__` begins the request's unit of work (so it encloses
  middleware); `Flask.wsgi_app` joins it, or begins one when it is called
  directly.
- The running unit of work sits in its thread's slot: a ContextVar holds the
  slot, set once per thread and Context, and a unit begins and ends by
  assigning the slot's `unit` (a ContextVar set and reset per request cost
  about 3,000 instructions). A Context copied into another thread still holds
  the first thread's slot; the slot's thread ident tells, and a unit begun
  there gets its own slot. The unit stores the defaults read on every request
  (CPython 3.11 reads an instance's own value in a few instructions, a class
  default through the type on every read).
- What remains per request is mostly CPython's fixed cost per operation: the
  seven wrapper and ledger frames, the unit object, two clock reads, the
  counters and the lifetime buffer: about 450 bytecodes of ctxtrace next to
  about 3,200 of Flask's (counted with an opcode trace); about half of
  ctxtrace's instructions are the interpreter running those bytecodes.
  Measured by cutting the path short (2026-12-03, three processes each): the
  wrappers, the slot and the unit alone add about 14,000 instructions
  (+4.4 %); the request's bookkeeping (its counts, lifetime, endpoint, flight
  record and the stale check's test) the other 9,000. Python frames are not
  the cost: inlining the three ledger calls into the wrappers saved nothing
  measurable. Nor would the lean lane the budget's prototype used: with the
  endpoint not read and nothing counted or timed at the request's end at all
  (its upper bound), a request took 1,300 fewer (six processes a side);
  keeping each request's unit and end time in a buffer of a thousand instead,
  for a drain off the path, cost 1,200 more (held objects are work for the
  garbage collector). The 5 % budget
  (about 15,900) sits barely above the 14,000 of wrappers, slot and unit.
- The building blocks, in instructions on CPython 3.11 (callgrind, 2026-11-25):
  a Python function call about 700; a ContextVar set about 1,400; a weak
  reference about 1,000; a monotonic clock read about 530; reading the caller's
  code and line through `sys._getframe` about 1,800 (CPython materialises the
  frame objects); one bytecode about 20. Bare Flask runs about 11,600
  instructions per microsecond of a push/pop pair. A tracked pair needs two
  wrapper calls, the caller's line, two clock reads, a weak reference and the
  mirror's two ContextVar sets: about 10,000 instructions before any
  bookkeeping, close to the whole 1 us budget.
- Where the pair's +27,000 go, measured by taking one piece out at a time
  (2026-12-03, three processes each): the caller's line about 5,400 (the walk
  materialises two frames: Flask's `__enter__` and the caller's); the mirror
  stack's ContextVar gets and sets about 4,200; the weak reference about
  1,900; the trace context captured for a late span about 1,100; the rest
  (the two wrappers, the record, the registry insert and delete, two clock
  reads, the counts, depth and flight record) about 14,400. The weak reference
  is what finds a context leaked in a Context that was thrown away (reason
  `collected`); the prototype behind the 16,000 budget had none, nor a mirror,
  depth or push counts.
"""


def _us(ns: float) -> str:
    return f"{ns / 1000:.2f}"


def _versions() -> str:
    names = [
        "flask", "werkzeug", "opentelemetry-sdk", "opentelemetry-instrumentation-flask",
        "sentry-sdk", "gunicorn", "ctxtrace",
    ]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _cell(cells: list[Cell], config: str, name: str) -> Cell | None:
    return next((c for c in cells if c.config == config and c.workload == name), None)


def timing_table(cells: list[Cell]) -> list[str]:
    lines = [
        "| workload | configuration | median (us) | min-max (us) | vs bare | added |",
        "|---|---|---|---|---|---|",
    ]
    for name in WORKLOADS:
        bare = _cell(cells, "bare", name)
        for config in CONFIGS:
            cell = _cell(cells, config, name)
            if cell is None:
                continue
            ratio = cell.median / bare.median if bare else float("nan")
            added = cell.median - bare.median if bare else float("nan")
            lines.append(
                f"| {name} | {config} | {_us(cell.median)} | {_us(min(cell.samples))}-"
                f"{_us(max(cell.samples))} | {ratio:.3f} | {added / 1000:+.2f} us |"
            )
    return lines


def budget_lines(
    cells: list[Cell],
    runs: list[ServerRun],
    instr: dict[str, dict[str, float]],
    soak: dict[str, Any],
) -> list[str]:
    """Issue 14's budgets, each checked against this run's numbers; instruction counts are
    the measure (steady to about 1 %), wall time beside them, and the instruction counts
    before the issue's work (``BEFORE_ISSUE_14``) for comparison."""
    lines = ["| budget | before | measured | holds |", "|---|---|---|---|"]

    def row(text: str, before: str, measured: str, holds: bool) -> None:
        lines.append(f"| {text} | {before} | {measured} | {'yes' if holds else '**no**'} |")

    def over(counts: dict[str, float], config: str = "ctxtrace") -> float:
        return counts[config] / counts["bare"] - 1

    def added(counts: dict[str, float], config: str = "ctxtrace") -> float:
        return counts[config] - counts["bare"]

    was = BEFORE_ISSUE_14
    for name, how in (("request", "app(...)"), ("wsgi_app", "app.wsgi_app(...)")):
        if name in instr:
            row(f"trivial request via {how}, ctxtrace <= 5 % over bare (instructions)",
                f"{over(was[name]):+.1%}", f"{over(instr[name]):+.1%}", over(instr[name]) <= 0.05)
        bare, ours = _cell(cells, "bare", name), _cell(cells, "ctxtrace", name)
        if bare and ours:
            ratio = ours.median / bare.median - 1
            row(f"trivial request via {how}, ctxtrace over bare (time, for comparison)", "",
                f"{ratio:+.1%}", True)
    if "push_pop" in instr:
        row("app-context push/pop pair, <= 16,000 instructions added",
            f"{added(was['push_pop']):+,.0f}", f"{added(instr['push_pop']):+,.0f}",
            added(instr["push_pop"]) <= 16_000)
    if "proxy_access" in instr:
        row("successful current_app access, < 2 % over bare (instructions)", "",
            f"{over(instr['proxy_access']):+.1%}", over(instr["proxy_access"]) < 0.02)
    request = instr.get("request", {})
    if "spans_all" in request and "otel" in request:
        ours_added, theirs_added = added(request, "spans_all"), added(request, "otel")
        earlier = was["request"]
        before = f"{added(earlier, 'spans_all'):+,.0f} vs {added(earlier, 'otel'):+,.0f}"
        row("spans=all adds < 1/4 of what OpenTelemetry's Flask instrumentation adds "
            "(instructions)", before, f"{ours_added:+,.0f} vs {theirs_added:+,.0f}",
            0 < ours_added < theirs_added / 4)
    if "failed_access" in instr:
        row("a repeated failed access at one site, <= 30,000 instructions added",
            f"{added(was['failed_access']):+,.0f}", f"{added(instr['failed_access']):+,.0f}",
            added(instr["failed_access"]) <= 30_000)
    if "gunicorn" in instr:
        row("gunicorn sync worker, instructions per request, ctxtrace within 2 % of bare", "",
            f"{over(instr['gunicorn']):+.1%}", over(instr["gunicorn"]) <= 0.02)
    by_config = {r.config: r for r in runs}
    if "bare" in by_config and "ctxtrace" in by_config:
        bare_median = statistics.median(by_config["bare"].rps)
        median = statistics.median(by_config["ctxtrace"].rps)
        row("gunicorn req/s, ctxtrace within 2 % of bare's median", "",
            f"{median:.0f} vs {bare_median:.0f} ({median / bare_median - 1:+.1%})",
            median >= 0.98 * bare_median)
        bare_cpu = statistics.median(by_config["bare"].cpu_us)
        cpu = statistics.median(by_config["ctxtrace"].cpu_us)
        row("gunicorn workers' CPU per request, ctxtrace over bare (for comparison)", "",
            f"{cpu:.0f} vs {bare_cpu:.0f} us ({cpu / bare_cpu - 1:+.1%})", True)
    growth = soak["peak_rss_after_warmup"] - soak["warmup_rss"]
    row(
        "memory and tracked contexts flat once the ledger cap is reached (soak.py's checks)", "",
        f"RSS +{growth / 2**20:.1f} MiB after warm-up, tracked peak {soak['peak_tracked']:,} "
        f"(cap {soak['cap']:,})",
        not soak["failures"],
    )
    return lines


def instruction_table(instr: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| workload | configuration | instructions | added | vs bare |", "|---|---|---|---|---|"
    ]
    for name, by_config in instr.items():
        bare = by_config["bare"]
        for config, count in by_config.items():
            lines.append(
                f"| {name} | {config} | {count:,.0f} | {count - bare:+,.0f} | "
                f"{count / bare:.3f} |"
            )
    return lines


def server_table(runs: list[ServerRun]) -> list[str]:
    lines = [
        "| configuration | req/s median | req/s min-max | p99 ms median | p99 ms min-max "
        "| worker CPU us/request median | min-max |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.config} | {statistics.median(run.rps):.0f} | {min(run.rps):.0f}-"
            f"{max(run.rps):.0f} | {statistics.median(run.p99_ms):.2f} | "
            f"{min(run.p99_ms):.2f}-{max(run.p99_ms):.2f} | "
            f"{statistics.median(run.cpu_us):.0f} | "
            f"{min(run.cpu_us):.0f}-{max(run.cpu_us):.0f} |"
        )
    return lines


def memory_table(soak: dict[str, Any]) -> list[str]:
    mib = 2**20
    samples = soak["samples"]
    step = max(1, len(samples) // 10)
    lines = ["| contexts so far | RSS (MiB) | tracked contexts |", "|---|---|---|"]
    for sample in samples[step - 1 :: step]:
        lines.append(
            f"| {sample['contexts']:,} | {sample['rss'] / mib:.1f} | {sample['tracked']:,} |"
        )
    lines += [
        "",
        f"Ledger cap {soak['cap']:,}; leaks made {sum(soak['leaks'].values()):,}; pushes "
        f"turned away at the cap {soak['dropped']:,}; warm-up {soak['warmup']:,} contexts. "
        f"RSS at the end of the warm-up {soak['warmup_rss'] / mib:.1f} MiB, peak after it "
        f"{soak['peak_rss_after_warmup'] / mib:.1f} MiB; objects the collector tracks "
        f"{soak['warmup_objects']:,}, peak after {soak['peak_objects_after_warmup']:,}. "
        f"{soak['contexts']:,} contexts in {soak['seconds']} s.",
        "",
        "Checks: " + ("; ".join(soak["failures"]) if soak["failures"] else "all hold."),
    ]
    return lines


def render(
    args: argparse.Namespace,
    cells: list[Cell],
    runs: list[ServerRun],
    instr: dict[str, dict[str, float]],
    soak: dict[str, Any],
) -> str:
    skipped = [c for c in CONFIGS if not available(c)]
    lines = [
        "# Performance",
        "",
        "What ctxtrace costs next to bare Flask and the tools people use instead.",
        "Regenerated by `python benchmarks/overhead.py` (see its docstring for the method);",
        "the README quotes the headline ratios.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {_machine()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Versions: {_versions()}",
        f"- Run: {args.rounds} rounds, {args.loops} calls per sample "
        f"({args.loops // REQUEST_LOOPS_DIVISOR} for requests), each the best of 3 batches, "
        f"{args.clock} clock" + (" (smoke mode: numbers are not meaningful)" if args.smoke else ""),
        "- Every configuration, bare included, has global OpenTelemetry SDK providers installed "
        "(exporting into nothing)",
    ]
    if skipped:
        lines.append(f"- Skipped (not installed): {', '.join(skipped)}")
    lines += ["", "## Budget (issue 14)", "", *budget_lines(cells, runs, instr, soak)]
    lines += ["", "## Per operation", ""]
    lines += [f"- `{k}`: {v}" for k, v in CONFIGS.items()]
    lines += [""] + [f"- `{k}`: {v}" for k, v in WORKLOADS.items()]
    lines += ["", *timing_table(cells)]
    lines += ["", "## Instructions per trivial request (callgrind)", ""]
    if instr:
        lines += [
            "Instructions per call, the difference of a short and a long run in one process;",
            "the push/pop pair, the proxy access and a repeated failed access alongside, and",
            "the request also with spans=all and with OpenTelemetry's Flask instrumentation;",
            "`gunicorn`: one HTTP request served by a gunicorn sync worker (main thread).",
            "",
            *instruction_table(instr),
        ]
    else:
        lines.append("valgrind is not installed; skipped.")
    lines += ["", "## gunicorn, 2 sync workers, loopback", ""]
    if runs:
        lines.append(
            f"{args.server_seconds:g} s of load per run from {args.client_threads} client "
            f"threads in a second process; {len(runs[0].rps)} runs per configuration, "
            "interleaved."
        )
        lines += ["", *server_table(runs)]
    else:
        lines.append("gunicorn is not installed; skipped.")
    lines += ["", f"## Memory over {args.contexts:,} contexts, 1 % leaked", ""]
    lines += memory_table(soak)
    lines += ["", *HOT_PATH_NOTES.strip().splitlines()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part, briefly")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20_000)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--server-seconds", type=float, default=5.0)
    parser.add_argument("--client-threads", type=int, default=4)
    parser.add_argument("--contexts", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, default=1_000)
    parser.add_argument("--out", type=Path, help=f"where the table goes (default {DOC})")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--callgrind-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, name, loops, clock = args.worker
        timing_worker(config, name, int(loops), clock)
        return
    if args.callgrind_worker:
        callgrind_worker(*args.callgrind_worker)
        return
    if args.load_worker:
        port, seconds, threads, limit = args.load_worker
        load_worker(int(port), float(seconds), int(threads), int(limit))
        return
    if args.smoke:
        args.rounds, args.loops, args.server_seconds = 1, 200, 0.5
        args.contexts, args.cap = 20_000, 16
    configs = [c for c in CONFIGS if c in args.configs.split(",") and available(c)]
    if "bare" not in configs:
        configs.insert(0, "bare")
    started = time.monotonic()

    def part(name: str) -> None:
        print(f"{name} done at {time.monotonic() - started:.0f} s", file=sys.stderr)

    cells = timings(
        configs, args.rounds, args.loops, args.clock, (os.cpu_count() or 1) if args.smoke else 1
    )
    part("timings")
    runs = server_runs(args.rounds, args.server_seconds, args.client_threads)
    part("gunicorn")
    instr = instructions(args.smoke)
    part("callgrind")
    soak = memory(args.contexts, args.cap, args.smoke)
    part("memory")
    text = render(args, cells, runs, instr, soak)
    out = args.out if args.out is not None else (None if args.smoke else DOC)
    if out is not None:
        out.write_text(text)
    print(text)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
