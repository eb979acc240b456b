"""What ctxtrace costs, next to bare Flask and the tools people use instead (issue 7).

Run ``python benchmarks/overhead.py`` (about ten minutes on a 2-core machine); it
rewrites ``docs/performance.md``. ``--smoke`` runs every part briefly and writes
the table only where ``--out`` says (CI runs it so the benchmark cannot rot; it
asserts nothing about timings).

Four parts, each measured the way its noise allows:

- **Per-operation timings.** Every (configuration, workload) cell in a fresh
  process, the configurations interleaved in each of ``--rounds`` rounds; each
  sample is the best of three batches of ``--loops`` calls. Medians with min-max,
  and the ratio to bare Flask from the same run.
- **Real server.** gunicorn with 2 sync workers on loopback, loaded for a fixed
  time by a threaded HTTP client of our own in a second process; requests per
  second and p99 latency, bare and ctxtrace interleaved over the rounds.
- **Instructions.** ``valgrind --tool=callgrind`` counts the instructions of the
  trivial request loop, bare and with ctxtrace: two runs of different lengths,
  differenced, so start-up cancels out. These repeat run to run (to within a
  few hundred instructions: addresses feed some hashes), where wall-clock time
  on a shared machine does not.
- **Memory.** 10^6 contexts pushed and popped by user code, 1 % of them leaked
  (pushed in a Context that is then dropped, the context itself kept alive):
  peak RSS and the number of tracked contexts, which stop growing at the
  ledger's cap (lowered here so most of the run is past it).

Configurations (SDK providers export into exporters that drop everything, so
the export itself is not measured):

- ``bare``: Flask alone.
- ``ctxtrace``: ``ctxtrace.instrument(metrics="none")``, the defaults otherwise
  (spans only for anomalies; no metrics exporter, so no port per process).
- ``spans_all``: ``spans="all"``, an SDK TracerProvider sampling everything
  through a BatchSpanProcessor.
- ``all_options``: every detector, the flight record, ``repair``, ``long_lived``
  for app and streaming contexts, a suppression list, metrics through an SDK
  MeterProvider.
- ``otel``/``otel_unsampled``: OpenTelemetry's Flask instrumentation, sampler
  always on / always off.
- ``otel_ctxtrace``: OpenTelemetry's Flask instrumentation (sampled) and ctxtrace.
- ``sentry``: sentry-sdk's Flask integration, ``traces_sample_rate=1.0``, a
  transport that drops envelopes; requests go through ``app(...)``, the WSGI
  callable, as a server calls it (through ``app.wsgi_app`` its tracing never runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from harness import Cell, run_cells, time_loop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"

CONFIGS: dict[str, str] = {
    "bare": "Flask alone",
    "ctxtrace": "ctxtrace defaults (metrics off)",
    "spans_all": "ctxtrace spans=all, SDK tracer, sampled 100 %",
    "all_options": "ctxtrace, every option on",
    "otel": "OpenTelemetry Flask instrumentation, sampled",
    "otel_unsampled": "OpenTelemetry Flask instrumentation, sampler off",
    "otel_ctxtrace": "OpenTelemetry Flask instrumentation (sampled) + ctxtrace",
    "sentry": "sentry-sdk Flask integration, traces 1.0, envelopes dropped",
}
WORKLOADS: dict[str, str] = {
    "request": "trivial view through app(environ, start_response)",
    "request_g_url_for": "a view that sets g and calls url_for",
    "push_pop": "with app.app_context(): pass",
    "proxy_access": "current_app.name, an app context pushed",
    "failed_access": "current_app.name with no context (RuntimeError caught)",
}
# Request workloads run for every configuration; the context workloads only where
# something hooks contexts (the others leave pushes and proxies untouched).
CONTEXT_CONFIGS = ("bare", "ctxtrace", "spans_all", "all_options")
REQUEST_WORKLOADS = ("request", "request_g_url_for")
REQUEST_LOOPS_DIVISOR = 5
# What each configuration needs installed beyond ctxtrace's test extra.
NEEDS: dict[str, str] = {"sentry": "sentry_sdk"}


# -- one configuration in one process -------------------------------------------------


def _sdk_tracing(sampled: bool = True) -> Any:
    """A global SDK TracerProvider exporting through a batch processor into nothing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)
    return provider


def _sdk_metrics() -> None:
    """A global SDK MeterProvider whose reader exports into nothing every second."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )

    class Dropped(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kw: Any) -> Any:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kw: Any) -> None:
            return None

    reader = PeriodicExportingMetricReader(Dropped(), export_interval_millis=1000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


def _ctxtrace(**options: Any) -> None:
    import structlog

    import ctxtrace

    ctxtrace.instrument(**options)
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
    if config in ("spans_all", "otel", "otel_ctxtrace"):
        _sdk_tracing()
    if config == "otel_unsampled":
        _sdk_tracing(sampled=False)
    if config == "ctxtrace":
        _ctxtrace(metrics="none")
    elif config == "spans_all":
        _ctxtrace(metrics="none", spans="all")
    elif config == "all_options":
        _sdk_metrics()
        _ctxtrace(
            repair=True, long_lived_app=30, long_lived_streaming=True, flight_record=16,
            suppress="some.vendored.module,vendor/thing.py:12",
        )
    elif config == "otel_ctxtrace":
        _ctxtrace(metrics="none")
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


def workload(name: str, app: Any) -> Callable[[], object]:
    from flask import current_app
    from werkzeug.test import EnvironBuilder

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    if name in REQUEST_WORKLOADS:
        environ = EnvironBuilder(path="/" if name == "request" else "/page").get_environ()

        def request() -> None:
            for _ in app(dict(environ), start_response):
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


def timing_worker(config: str, name: str, loops: int) -> None:
    hook = configure(config)
    app = make_app()
    hook(app)
    body = workload(name, app)
    for _ in range(min(loops, 2000)):
        body()
    print(json.dumps({"ns": time_loop(body, loops)}))


def callgrind_worker(config: str, name: str, calls: int) -> None:
    hook = configure(config)
    app = make_app()
    hook(app)
    body = workload(name, app)
    for _ in range(calls):
        body()


def memory_worker(config: str, contexts: int, cap: int) -> None:
    """Push and pop ``contexts`` app contexts, 1 % leaked; print samples as JSON."""
    import contextvars

    if config == "ctxtrace":
        _ctxtrace(metrics="none", ledger_cap=cap, sweep_interval=3600)
    from ctxtrace import _agent

    app = make_app()
    leaked: list[Any] = []
    samples: list[dict[str, int]] = []
    step = max(1, contexts // 10)
    for i in range(1, contexts + 1):
        ctx = app.app_context()
        if i % 100 == 0:
            # Pushed in a Context nobody returns to: never popped, kept alive.
            contextvars.copy_context().run(ctx.push)
            leaked.append(ctx)
        else:
            ctx.push()
            ctx.pop()
        if i % step == 0:
            agent = _agent.current()
            ledger = agent.ledger if agent is not None else None
            samples.append(
                {
                    "contexts": i,
                    "rss_kb": _rss_kb(),
                    "tracked": ledger.live_count() if ledger is not None else 0,
                    "dropped": int(repr(ledger.dropped_contexts)[6:-1]) if ledger else 0,
                }
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"samples": samples, "peak_rss_kb": peak, "leaked": len(leaked)}))


def _rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


# -- the load client (its own process) ----------------------------------------------


def load_worker(port: int, seconds: float, threads: int, limit: int) -> None:
    """GET / as fast as ``threads`` threads can for ``seconds`` (at most ``limit`` in all)."""
    import http.client

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
    print(json.dumps({"rps": len(done) / elapsed, "p99_ms": p99 * 1000, "errors": sum(errors)}))


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


def timings(configs: Sequence[str], rounds: int, loops: int) -> list[Cell]:
    cells: list[Cell] = []
    request_configs = [c for c in configs if available(c)]
    context_configs = [c for c in request_configs if c in CONTEXT_CONFIGS]
    # A request costs 20-600 us, a context operation 1-10 us: fewer calls per sample.
    request_loops = max(1, loops // REQUEST_LOOPS_DIVISOR)
    cells += run_cells(__file__, request_configs, REQUEST_WORKLOADS, rounds, request_loops)
    context_workloads = [w for w in WORKLOADS if w not in REQUEST_WORKLOADS]
    cells += run_cells(__file__, context_configs, context_workloads, rounds, loops)
    return cells


@dataclass(frozen=True)
class ServerRun:
    config: str
    rps: tuple[float, ...]
    p99_ms: tuple[float, ...]


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


def server_round(config: str, seconds: float, threads: int) -> dict[str, float]:
    """One gunicorn run: start 2 workers, warm up, load, stop."""
    port = _free_port()
    env = dict(os.environ, CTXTRACE_BENCH_CONFIG=config, PYTHONPATH=str(HERE))
    env.pop("CTXTRACE_METRICS", None)
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
            "--no-control-socket", "--log-level", "warning", "bench_wsgi:app",
        ],
        env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(port, 20)
        client = [sys.executable, __file__, "--load-worker", str(port)]
        # A short warm-up, then the measured run; both bounded in time and count.
        subprocess.run([*client, "0.5", str(threads), "100000"], check=True, capture_output=True)
        out = subprocess.run(
            [*client, str(seconds), str(threads), "1000000"],
            check=True, capture_output=True, text=True,
        ).stdout
        return dict(json.loads(out))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def server_runs(rounds: int, seconds: float, threads: int) -> list[ServerRun]:
    if shutil.which("gunicorn") is None and not _has_module("gunicorn"):
        return []
    results: dict[str, list[dict[str, float]]] = {"bare": [], "ctxtrace": []}
    for _ in range(rounds):
        for config, runs in results.items():
            # bench_wsgi knows ctxtrace's defaults as "default".
            runs.append(
                server_round("default" if config == "ctxtrace" else "bare", seconds, threads)
            )
    return [
        ServerRun(c, tuple(r["rps"] for r in runs), tuple(r["p99_ms"] for r in runs))
        for c, runs in results.items()
    ]


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# Calls per callgrind run, short and long, by workload: the difference of the two
# runs, divided by the difference of calls, is the cost of one call.
CALLGRIND_CALLS: dict[str, tuple[int, int]] = {
    "request": (200, 1200),
    "push_pop": (2000, 12000),
    "proxy_access": (5000, 30000),
}


def instructions() -> dict[str, dict[str, float]]:
    """Instructions per call by workload and configuration, from callgrind (if installed).

    Instruction counts do not depend on what else the machine runs, so every
    run starts at once.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {}
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("CTXTRACE_METRICS", None)
    runs: dict[tuple[str, str, int], subprocess.Popen[str]] = {}
    for name, lengths in CALLGRIND_CALLS.items():
        for config in ("bare", "ctxtrace"):
            for calls in lengths:
                runs[(name, config, calls)] = subprocess.Popen(
                    [
                        valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                        sys.executable, __file__, "--callgrind-worker", config, name, str(calls),
                    ],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )
    counts: dict[tuple[str, str, int], int] = {}
    for key, run in runs.items():
        _, stderr = run.communicate()
        found = re.search(r"Collected : (\d+)", stderr)
        if run.returncode != 0 or found is None:
            return {}
        counts[key] = int(found.group(1))
    result: dict[str, dict[str, float]] = {}
    for name, (short, long) in CALLGRIND_CALLS.items():
        result[name] = {
            config: (counts[(name, config, long)] - counts[(name, config, short)]) / (long - short)
            for config in ("bare", "ctxtrace")
        }
    return result


def memory(contexts: int, cap: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for config in ("bare", "ctxtrace"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", config, str(contexts), str(cap)],
            check=True, capture_output=True, text=True,
        ).stdout
        results[config] = json.loads(out)
    return results


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
  and every rule applies to them as to any other context. `spans=all` and
  `log_lifecycle` keep full records from the push.
- Proxies: a successful `current_app`/`g`/`request` lookup runs werkzeug's own
  code object; only the name `RuntimeError` in it is bound to a function that
  records the failure and builds the same error.
- Pushes by user code are tracked with their line: code objects are classified
  once, sites cached per code object and instruction offset.
- What remains per request is mostly CPython's fixed cost per operation: five
  wrapper frames, the unit of work (an object and a ContextVar set/reset), two
  clock reads, the counters and the lifetime buffer, about 250 bytecodes in all.
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


def timing_table(cells: list[Cell]) -> list[str]:
    base = {c.workload: c for c in cells if c.config == "bare"}
    lines = [
        "| workload | configuration | median (us) | min-max (us) | vs bare | added |",
        "|---|---|---|---|---|---|",
    ]
    for name in WORKLOADS:
        for config in CONFIGS:
            cell = next((c for c in cells if c.config == config and c.workload == name), None)
            if cell is None:
                continue
            bare = base.get(name)
            ratio = cell.median / bare.median if bare else float("nan")
            added = cell.median - bare.median if bare else float("nan")
            lines.append(
                f"| {name} | {config} | {_us(cell.median)} | {_us(min(cell.samples))}-"
                f"{_us(max(cell.samples))} | {ratio:.3f} | {added / 1000:+.2f} us |"
            )
    return lines


def _cell(cells: list[Cell], config: str, name: str) -> Cell | None:
    return next((c for c in cells if c.config == config and c.workload == name), None)


def budget_lines(
    cells: list[Cell], runs: list[ServerRun], instr: dict[str, dict[str, float]]
) -> list[str]:
    """Issue 7's budget, each line checked against this run's numbers."""
    lines = ["| budget | measured | holds |", "|---|---|---|"]

    def row(text: str, measured: str, holds: bool | None) -> None:
        verdict = "n/a" if holds is None else ("yes" if holds else "**no**")
        lines.append(f"| {text} | {measured} | {verdict} |")

    bare, ours = _cell(cells, "bare", "request"), _cell(cells, "ctxtrace", "request")
    if bare and ours:
        over = ours.median / bare.median - 1
        row("trivial request, ctxtrace <= 5 % over bare (time)", f"{over:+.1%}", over <= 0.05)
    if "request" in instr:
        over = instr["request"]["ctxtrace"] / instr["request"]["bare"] - 1
        row("trivial request, ctxtrace <= 5 % over bare (instructions)", f"{over:+.1%}",
            over <= 0.05)
    bare, ours = _cell(cells, "bare", "push_pop"), _cell(cells, "ctxtrace", "push_pop")
    if bare and ours:
        added = ours.median - bare.median
        row("app-context push/pop pair, <= 1 us added", f"{added / 1000:+.2f} us", added <= 1000)
    if bare and "push_pop" in instr:
        # Instructions are steadier than time: priced at bare Flask's own ns per instruction.
        counts = instr["push_pop"]
        added = (counts["ctxtrace"] - counts["bare"]) * bare.median / counts["bare"]
        row(
            "app-context push/pop pair, <= 1 us added (instructions, at bare's ns each)",
            f"{counts['ctxtrace'] - counts['bare']:+,.0f} instr, about {added / 1000:+.2f} us",
            added <= 1000,
        )
    bare, ours = _cell(cells, "bare", "proxy_access"), _cell(cells, "ctxtrace", "proxy_access")
    if bare and ours:
        over = ours.median / bare.median - 1
        row("successful current_app access, < 2 % over bare", f"{over:+.1%}", over < 0.02)
    if "proxy_access" in instr:
        over = instr["proxy_access"]["ctxtrace"] / instr["proxy_access"]["bare"] - 1
        row("successful current_app access, < 2 % over bare (instructions)", f"{over:+.1%}",
            over < 0.02)
    bare = _cell(cells, "bare", "request")
    spans, otel = _cell(cells, "spans_all", "request"), _cell(cells, "otel", "request")
    if bare and spans and otel:
        ours_added = spans.median - bare.median
        theirs_added = otel.median - bare.median
        row(
            "spans=all adds < 1/4 of what OpenTelemetry's Flask instrumentation adds",
            f"{ours_added / 1000:+.1f} us vs {theirs_added / 1000:+.1f} us",
            theirs_added > 0 and ours_added < theirs_added / 4,
        )
    by_config = {r.config: r for r in runs}
    if "bare" in by_config and "ctxtrace" in by_config:
        low, high = min(by_config["bare"].rps), max(by_config["bare"].rps)
        median = statistics.median(by_config["ctxtrace"].rps)
        row(
            "gunicorn req/s, ctxtrace within the spread of bare (or above it)",
            f"{median:.0f} vs [{low:.0f}, {high:.0f}]",
            median >= low,
        )
    return lines


def server_table(runs: list[ServerRun]) -> list[str]:
    lines = [
        "| configuration | req/s median | req/s min-max | p99 ms median | p99 ms min-max |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.config} | {statistics.median(run.rps):.0f} | {min(run.rps):.0f}-"
            f"{max(run.rps):.0f} | {statistics.median(run.p99_ms):.2f} | "
            f"{min(run.p99_ms):.2f}-{max(run.p99_ms):.2f} |"
        )
    return lines


def memory_table(result: dict[str, Any], cap: int) -> list[str]:
    lines = [
        "| contexts so far | RSS bare (MB) | RSS ctxtrace (MB) | tracked | turned away |",
        "|---|---|---|---|---|",
    ]
    bare, ours = result["bare"]["samples"], result["ctxtrace"]["samples"]
    for b, o in zip(bare, ours, strict=False):
        lines.append(
            f"| {o['contexts']:,} | {b['rss_kb'] / 1024:.1f} | {o['rss_kb'] / 1024:.1f} | "
            f"{o['tracked']:,} | {o['dropped']:,} |"
        )
    lines.append("")
    lines.append(
        f"Peak RSS: bare {result['bare']['peak_rss_kb'] / 1024:.1f} MB, ctxtrace "
        f"{result['ctxtrace']['peak_rss_kb'] / 1024:.1f} MB; ledger cap {cap:,}; "
        f"{result['ctxtrace']['leaked']:,} contexts leaked."
    )
    return lines


def render(
    args: argparse.Namespace,
    cells: list[Cell],
    runs: list[ServerRun],
    instr: dict[str, dict[str, float]],
    mem: dict[str, Any],
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
        f"({args.loops // REQUEST_LOOPS_DIVISOR} for requests), each the best of 3 batches"
        + (" (smoke mode: numbers are not meaningful)" if args.smoke else ""),
    ]
    if skipped:
        lines.append(f"- Skipped (not installed): {', '.join(skipped)}")
    lines += ["", "## Budget (issue 7)", "", *budget_lines(cells, runs, instr)]
    lines += ["", "## Per operation", ""]
    lines += [f"- `{k}`: {v}" for k, v in CONFIGS.items()]
    lines += [""] + [f"- `{k}`: {v}" for k, v in WORKLOADS.items()]
    lines += ["", *timing_table(cells)]
    lines += ["", "## Instructions per call (callgrind)", ""]
    if args.smoke:
        lines.append("Skipped in smoke mode.")
    elif instr:
        lines += [
            "| workload | bare | ctxtrace | added | vs bare |",
            "|---|---|---|---|---|",
        ]
        for name, by_config in instr.items():
            bare, ours = by_config["bare"], by_config["ctxtrace"]
            lines.append(
                f"| {name} | {bare:,.0f} | {ours:,.0f} | {ours - bare:+,.0f} | {ours / bare:.3f} |"
            )
    else:
        lines.append("valgrind is not installed; skipped.")
    lines += ["", "## gunicorn, 2 sync workers, loopback", ""]
    if runs:
        lines.append(
            f"{args.server_seconds:g} s of load per run from {args.client_threads} client "
            f"threads in a second process; {args.rounds} runs per configuration, interleaved."
        )
        lines += ["", *server_table(runs)]
    else:
        lines.append("gunicorn is not installed; skipped.")
    lines += ["", f"## Memory over {args.contexts:,} contexts, 1 % leaked", ""]
    lines += memory_table(mem, args.cap)
    lines += ["", *HOT_PATH_NOTES.strip().splitlines()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part, briefly")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20_000)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--server-seconds", type=float, default=5.0)
    parser.add_argument("--client-threads", type=int, default=4)
    parser.add_argument("--contexts", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, default=2_000)
    parser.add_argument("--out", type=Path, help=f"where the table goes (default {DOC})")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--callgrind-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        timing_worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return
    if args.callgrind_worker:
        config, name, calls = args.callgrind_worker
        callgrind_worker(config, name, int(calls))
        return
    if args.memory_worker:
        config, contexts, cap = args.memory_worker
        memory_worker(config, int(contexts), int(cap))
        return
    if args.load_worker:
        port, seconds, threads, limit = args.load_worker
        load_worker(int(port), float(seconds), int(threads), int(limit))
        return
    if args.smoke:
        args.rounds, args.loops, args.server_seconds = 1, 200, 0.5
        args.contexts, args.cap = 10_000, 50
    configs = [c for c in args.configs.split(",") if c in CONFIGS]
    if "bare" not in configs:
        configs.insert(0, "bare")
    started = time.monotonic()
    cells = timings(configs, args.rounds, args.loops)
    runs = server_runs(args.rounds if not args.smoke else 1, args.server_seconds,
                       args.client_threads)
    instr = {} if args.smoke else instructions()
    mem = memory(args.contexts, args.cap)
    text = render(args, cells, runs, instr, mem)
    out = args.out if args.out is not None else (None if args.smoke else DOC)
    if out is not None:
        out.write_text(text)
    print(text)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
