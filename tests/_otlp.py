"""An OTLP/HTTP receiver for the exporter and fault tests (opentelemetry-proto decodes)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def attributes(items: Any) -> dict[str, Any]:
    """OTLP key-value pairs (a resource's, a span's, a data point's) as a dict."""
    out: dict[str, Any] = {}
    for kv in items:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field)
    return out


class Point(NamedTuple):
    """One data point as it arrived: who sent it (resource attributes), in which metric."""

    resource: dict[str, Any]
    metric: Any
    point: Any


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1 that keeps every request body, decoded, and
    answers with ``status`` after ``delay`` seconds (a slow or a hanging collector)."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/x-protobuf"
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                if delay:
                    time.sleep(delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a hanging handler must not hold up close()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def spans(self) -> list[Any]:
        return [
            (rs.resource, span)
            for request in self.traces
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def metric(self, name: str) -> list[Any]:
        """The data points of ``name`` in the last metrics request that has it."""
        found: list[Any] = []
        for request in self.metrics:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name == name:
                            field = m.WhichOneof("data")
                            found = list(getattr(m, field).data_points)
        return found

    def points(self) -> Iterator[Point]:
        """Every data point of every metrics request, in the order they arrived."""
        for request in self.metrics:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        for point in getattr(m, m.WhichOneof("data")).data_points:
                            yield Point(resource, m, point)
