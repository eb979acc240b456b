"""SIGTERM keeps its meaning (issue 16, item 7).

ctxtrace installs no signal handler: with the default disposition the process
dies at once, even inside a long C call, and ``signal.getsignal`` answers what
the application set. Where the application (or its server) handles SIGTERM and
exits through ``sys.exit``, the atexit handler flushes the telemetry.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from ._otlp import Receiver
from ._servers import REPO, wait_until

_ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "CTXTRACE_METRICS": "none",
    "PYTHONPATH": str(REPO),
}

_DOUBLE_POP = textwrap.dedent(
    """
    import hashlib, signal, sys, time, ctxtrace
    from flask import Flask
    {before}
    ctxtrace.instrument()
    app = Flask('shop')
    ctx = app.app_context(); ctx.push(); ctx.pop()
    try:
        ctx.pop()
    except LookupError:
        pass
    print(signal.getsignal(signal.SIGTERM), flush=True)
    # A long C call that never looks at signals (about 5 s here).
    hashlib.pbkdf2_hmac('sha256', b'x', b'y', 15_000_000)
    time.sleep(60)
    """
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _run(receiver: Receiver, before: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CTXTRACE_"))}
    env |= {**_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    return subprocess.Popen(
        [sys.executable, "-c", _DOUBLE_POP.format(before=before)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def test_default_sigterm_kills_at_once_even_in_a_long_c_call(receiver: Receiver) -> None:
    """No handler of ours: getsignal says SIG_DFL and death does not wait for the C call."""
    with _run(receiver, "") as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == str(signal.SIG_DFL)
            time.sleep(0.3)  # inside the C call now
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == -signal.SIGTERM
            assert time.monotonic() - started < 1.0
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)


def test_the_applications_handler_is_what_getsignal_answers(receiver: Receiver) -> None:
    """A handler set before instrument() stays; its sys.exit runs atexit, which flushes."""
    before = "signal.signal(signal.SIGTERM, lambda n, f: sys.exit(0))"
    with _run(receiver, before) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip().startswith("<function <lambda>")
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
    wait_until(receiver.spans, timeout=5, what="the span flushed at exit")
    assert [span.name for _, span in receiver.spans()] == ["flask.app_context"]
