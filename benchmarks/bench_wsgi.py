"""The app gunicorn serves in the throughput part of ``overhead.py``.

``CTXTRACE_BENCH_CONFIG`` says what runs in each worker: ``bare`` (Flask alone) or
``default`` (ctxtrace with its defaults, metrics off: no exporter or port per worker).
ctxtrace is turned on in each worker as it imports this module (no ``--preload``).
"""

from __future__ import annotations

import os

from flask import Flask

CONFIG = os.environ.get("CTXTRACE_BENCH_CONFIG", "bare")

if CONFIG == "default":
    import structlog

    import ctxtrace

    ctxtrace.instrument(metrics="none")
    # Anomaly lines would go to stderr; a healthy run makes none, but keep the
    # benchmark's output clean either way.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())

app = Flask("bench")


@app.route("/")
def index() -> str:
    return "ok"
