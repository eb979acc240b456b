"""Each worker's own ``/metrics`` endpoint, and the file that tells Prometheus where it is.

OpenTelemetry's Prometheus reader is per process, and gunicorn-style servers run
several processes: each worker (made after fork) binds the first free port of
``CTXTRACE_PROMETHEUS_PORT`` on ``CTXTRACE_PROMETHEUS_HOST`` and, when
``CTXTRACE_PROMETHEUS_TARGETS_DIR`` is set, writes a Prometheus ``file_sd``
target file for itself there, ``<worker id>.json``::

    [{"targets": ["127.0.0.1:9465"], "labels": {"worker": "web-1:4242:gunicorn"}}]

One ``file_sd_configs`` job over ``<dir>/*.json`` then finds every worker. The
file goes when the worker exits; files of workers on this host that died without
cleaning up are removed by the next worker that starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import REGISTRY, CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from ctxtrace.telemetry.pids import alive

if TYPE_CHECKING:
    from ctxtrace._config import Config

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WILDCARDS = frozenset(("", "0.0.0.0", "::"))


def target_file_name(worker: str) -> str:
    """``host:pid:role`` made safe for any file system: ``host_pid_role.json``."""
    return _UNSAFE.sub("_", worker) + ".json"


def _owner(path: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of the worker a target file names, if it is one of ours."""
    try:
        groups = json.loads(path.read_text(encoding="utf-8"))
        worker = groups[0]["labels"]["worker"]
        host, pid, _role = str(worker).split(":")
        return host, int(pid)
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None


def remove_stale(folder: Path, host: str) -> list[Path]:
    """Delete target files of this host's workers whose process is gone."""
    removed: list[Path] = []
    for path in sorted(folder.glob("*.json")):
        owner = _owner(path)
        if owner is None or owner[0] != host or owner[1] == os.getpid() or alive(owner[1]):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


class Endpoint:
    """A running ``/metrics`` server and, optionally, its target file."""

    def __init__(self, server: Any, thread: threading.Thread, address: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.address = address
        self.port = port
        self.target_file: Path | None = None
        self._pid = os.getpid()

    @property
    def target(self) -> str:
        host = self.address
        if host in _WILDCARDS:
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def write_target_file(self, folder: Path, worker: str) -> Path:
        """Write (atomically) the file_sd entry for this endpoint; stale ones go first."""
        folder.mkdir(parents=True, exist_ok=True)
        host = worker.split(":", 1)[0]
        remove_stale(folder, host)
        path = folder / target_file_name(worker)
        temporary = folder / f".{path.name}.{os.getpid()}.tmp"
        payload = [{"targets": [self.target], "labels": {"worker": worker}}]
        temporary.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(temporary, path)
        self.target_file = path
        return path

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop serving and remove the target file (in the process that made them)."""
        if os.getpid() != self._pid:
            self.abandon()
            return
        try:
            # shutdown() waits for the serving loop's next poll; a connection of
            # our own wakes it at once (instrument/uninstrument cycles stay fast).
            stopper = threading.Thread(target=self.server.shutdown, daemon=True)
            stopper.start()
            self._wake()
            stopper.join(timeout_s)
            self.server.server_close()
            self.thread.join(timeout_s)
        finally:
            if self.target_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.target_file.unlink()
                self.target_file = None

    def _wake(self) -> None:
        host = self.server.server_address[0]
        if host in _WILDCARDS:
            host = "::1" if ":" in host else "127.0.0.1"
        with contextlib.suppress(OSError), socket.create_connection((host, self.port), 0.2):
            pass

    def abandon(self) -> None:
        """In a forked child: close the inherited socket; the file is the parent's."""
        self.target_file = None
        with contextlib.suppress(OSError):
            self.server.socket.close()


class _Quiet(WSGIRequestHandler):
    """No access log: scrapes are not the application's requests."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


#: Seconds between the serving thread's checks for a stop: also the longest a stop waits.
POLL_S = 0.1


def _listen(registry: Any, host: str, port: int) -> tuple[Any, threading.Thread]:
    """prometheus_client's WSGI server, with a serving loop that stops within ``POLL_S``."""
    family, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0][::4]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(
        str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_Quiet
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_S},
        name="ctxtrace-prometheus", daemon=True,
    )
    thread.start()
    return server, thread


def bind(registry: Any, host: str, ports: tuple[int, int]) -> Endpoint:
    """Serve ``registry`` on the first free port of ``ports`` (``(0, 0)``: the OS picks)."""
    low, high = ports
    last: OSError | None = None
    for port in range(low, high + 1):
        try:
            server, thread = _listen(registry, host, port)
        except OSError as exc:
            # Only a taken port moves on; a bad address would fail on every port.
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
            continue
        return Endpoint(server, thread, host, int(server.server_address[1]))
    raise OSError(f"no free port in {low}-{high} on {host}") from last


def add_process_metrics(registry: Any) -> None:
    """``process_start_time_seconds``, memory, CPU and open files, beside the OTel series.

    prometheus_client's own process collector (the default registry has one; ours is a
    registry of its own, so it gets one here). It reads ``/proc/self`` at each scrape,
    so a forked worker reports its own start and memory. The start time is what the
    alert rules use to tell a new worker's first anomaly from an old series seen again
    after a scrape gap. Where ``/proc`` is missing (macOS) it exports nothing.
    """
    ProcessCollector(registry=registry)


def serve(worker: str, config: Config) -> tuple[Endpoint, PrometheusMetricReader]:
    """A Prometheus reader on a registry of its own, served on this worker's endpoint."""
    # A registry per reader: restarts (and forks) make several in one process,
    # and one registry would serve them all at once.
    registry: Any = CollectorRegistry(auto_describe=False)
    try:
        reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    except TypeError:
        # Exporter releases before the ``registry`` keyword (spring 2026) always
        # register in the default registry; an abandoned reader must then be shut
        # down (unregistered) before the next one starts.
        reader = PrometheusMetricReader()
        registry = REGISTRY
    else:
        add_process_metrics(registry)
    try:
        endpoint = bind(registry, config.prometheus_host, config.prometheus_port)
    except BaseException:
        reader.shutdown()
        raise
    if config.prometheus_targets_dir:
        try:
            endpoint.write_target_file(Path(config.prometheus_targets_dir), worker)
        except BaseException:
            endpoint.close()
            reader.shutdown()
            raise
    return endpoint, reader
