"""Core overhead: a push/pop pair, a trivial request, a proxy access; bare and instrumented.

Run: ``python benchmarks/bench_core.py [--rounds N] [--loops N]``. Each cell runs in
a fresh process; the table reports ratios against bare Flask from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from harness import report, run_cells, time_loop

CONFIGS = ("bare", "ctxtrace")
WORKLOADS = ("push_pop", "request", "proxy_access", "failed_access")


def _app() -> Any:
    from flask import Flask

    app = Flask("bench")

    @app.route("/")
    def index() -> str:
        return "ok"

    return app


def _environ() -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder(path="/").get_environ()


def _workload(name: str, app: Any) -> Callable[[], object]:
    from flask import current_app

    if name == "push_pop":
        def body() -> None:
            with app.app_context():
                pass
        return body
    if name == "request":
        environ = _environ()

        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
            return None

        def request() -> None:
            for _ in app(dict(environ), start_response):
                pass
        return request
    if name == "proxy_access":
        ctx = app.app_context()
        ctx.push()
        return lambda: current_app.name
    if name == "failed_access":
        def failed() -> None:
            try:  # noqa: SIM105 - suppress() would add its own cost to what is measured
                current_app.name  # noqa: B018
            except RuntimeError:
                pass
        return failed
    raise SystemExit(f"unknown workload {name}")


def worker(config: str, workload: str, loops: int) -> None:
    if config == "ctxtrace":
        import ctxtrace

        ctxtrace.instrument(metrics="none", log_rate_window="off")
        import structlog

        structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    app = _app()
    body = _workload(workload, app)
    for _ in range(min(loops, 2000)):
        body()
    print(json.dumps({"ns": time_loop(body, loops)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=20_000)
    args = parser.parse_args()
    if args.worker:
        config, workload, loops = args.worker
        worker(config, workload, int(loops))
        return
    cells = run_cells(__file__, CONFIGS, WORKLOADS, args.rounds, args.loops)
    print(report(cells, "bare"))


if __name__ == "__main__":
    main()
