"""Every name from the application goes through one cleaner (issue 16, item 4).

An endpoint, app, thread, command or unit name with terminal escapes (ESC,
BEL, CR, LF, the one-byte CSI ``\\x9b``) or bidirectional overrides (U+202E)
must reach no log line, span, event or report unescaped, and no name is longer
than the bound.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from flask import Flask
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ctxtrace import _agent
from ctxtrace.commands.report import model as report_model
from ctxtrace.commands.report import sources as report_sources
from ctxtrace.commands.report import text as report_text
from ctxtrace.core.names import MAX_NAME, printable, safe_name

from .._support import clear_flask_stacks

NASTY = "\x1b[2J\x1b]0;pwned\x07\r\n\x9b31m\u202egnp.exe\u2066\u200f"
#: What must not come through: C0, DEL, C1, bidi controls, line separators.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
ENDPOINT = ("e" * 2500) + NASTY + ("e" * 2500)


def test_safe_name_removes_c0_c1_and_bidi_and_bounds_length() -> None:
    """The cleaner itself: every unsafe class, and the length."""
    cleaned = safe_name("a" + NASTY + "b")
    assert not UNSAFE.search(cleaned)
    assert cleaned.startswith("a?") and cleaned.endswith("b")
    assert len(safe_name(ENDPOINT)) == MAX_NAME
    assert safe_name("") == "?"
    assert printable("x\x1b[1m\u202ey") == "x\\x1b[1m\\u202ey"


@pytest.fixture
def telemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The application's own providers, in memory, handed to ctxtrace."""
    from ctxtrace.telemetry import providers as _providers  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    monkeypatch.setitem(_providers._explicit, "tracer", tracer_provider)
    monkeypatch.setitem(_providers._explicit, "meter", meter_provider)
    yield exporter
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _nasty_app() -> Flask:
    app = Flask("shop" + NASTY, root_path=str(Path(__file__).parent))

    def popped_twice() -> str:
        ctx = app.app_context()
        ctx.push()
        ctx.pop()
        with contextlib.suppress(AssertionError, LookupError, RuntimeError, ValueError):
            ctx.pop()  # a double pop, found in the request
        return "ok"

    app.add_url_rule("/twice", endpoint=ENDPOINT, view_func=popped_twice)
    return app


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _assert_clean(texts: list[str], where: str) -> None:
    for text in texts:
        assert not UNSAFE.search(text), f"unsafe character in {where}: {text[:300]!r}"
        assert "e" * (MAX_NAME + 1) not in text, f"unbounded name in {where}: {text[:300]!r}"


@pytest.mark.leaks_on_purpose
def test_nasty_names_reach_no_channel_raw(
    telemetry: InMemorySpanExporter, instrumented: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Endpoint, app, thread and command names: logs, spans and events carry them cleaned."""
    recorder = instrumented(spans="all")
    app = _nasty_app()
    assert app.test_client().get("/twice").status_code == 200
    clear_flask_stacks()

    def in_thread() -> None:
        app.app_context().push()

    worker = threading.Thread(target=in_thread, name="worker" + NASTY + "x" * 500)
    worker.start()
    worker.join(10)

    @click.command(name="cmd" + NASTY)
    def command() -> None:
        app.app_context().push()

    CliRunner().invoke(command, [], prog_name="other")
    clear_flask_stacks()
    agent = _agent.current()
    assert agent is not None
    agent.flush(5.0)

    found = recorder.anomalies()
    units = {a.context.unit.kind for a in found if a.context.unit is not None}
    # The request popped twice; the thread and the command each leaked one.
    assert "double_pop" in recorder.names() and {"thread", "command"} <= units
    events = [json.dumps(_event_strings(e)) for e in recorder.events]
    _assert_clean([s for e in recorder.events for s in _event_strings(e)], "events")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert any('"ctxtrace.leaked"' in line for line in lines)
    assert any(
        '"ctxtrace.double_pop"' in line and f"endpoint:{safe_name(ENDPOINT)}" in line
        for line in lines
    )
    _assert_clean([s for line in lines for s in _strings(json.loads(line))], "log lines")
    spans = telemetry.get_finished_spans()
    assert spans
    texts = [str(v) for span in spans for v in (span.attributes or {}).values()]
    texts += [
        str(v) for span in spans for ev in span.events for v in (ev.attributes or {}).values()
    ]
    _assert_clean(texts, "spans")
    assert any(
        (span.attributes or {}).get("flask.endpoint") == safe_name(ENDPOINT) for span in spans
    )
    assert events


def _event_strings(event: Any) -> list[str]:
    out: list[str] = []

    def walk(value: Any, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, depth + 1)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                if name != "carry":
                    walk(getattr(value, name, None), depth + 1)

    walk(event)
    return out


def test_the_text_report_escapes_what_it_prints(tmp_path: Path) -> None:
    """A log line with escapes in its fields: the report shows them escaped, never raw."""
    line = {
        "event": "ctxtrace.leaked", "anomaly": "leaked", "level": "error",
        "site": "endpoint:" + NASTY, "function": "view" + NASTY,
        "worker": "web\x1b]0;x\x07:1:gunicorn",
        "context_id": 1, "kind": "app", "app": "shop", "pid": 1,
        "timestamp": "2026-12-01T10:00:00Z",
    }
    log = tmp_path / "ctxtrace.log"
    log.write_text(json.dumps(line) + "\n")
    report = report_model.Report()
    report_sources.add_log_file(report, log)
    text = report_text.render_text(report)
    assert "leaked" in text
    assert not UNSAFE.search(text.replace("\n", "")), repr(text)
    assert "\\x1b" in text and "\\u202e" in text
