"""Each worker's own ``/metrics`` endpoint, and the file that tells Prometheus where it is.

OpenTelemetry's Prometheus reader is per process, and gunicorn-style servers run
several processes: each worker (made after fork) binds the first free port of
``CTXTRACE_PROMETHEUS_PORT`` on ``CTXTRACE_PROMETHEUS_HOST`` and, when
``CTXTRACE_PROMETHEUS_TARGETS_DIR`` is set, writes a Prometheus ``file_sd``
target file for itself there, ``<worker id>.json``::

    [{"targets": ["127.0.0.1:9465"], "labels": {"worker": "web-1:4242:gunicorn"}}]

One ``file_sd_configs`` job over ``<dir>/*.json`` then finds every worker. The
file goes when the worker exits; files of workers that died without cleaning up
are removed by the next worker that starts.

Nothing in that folder is trusted: others may be able to write it. A target file
is written to a temporary file made with ``O_EXCL|O_NOFOLLOW`` and renamed into
place; clean-up opens only small regular files, without following links and
without waiting on a FIFO. Whether a file's worker lives is told by a lock, not
a pid: each worker holds an ``flock`` on its own file for as long as it runs
(the kernel drops it when the process dies), which holds across PID namespaces
(containers that share a hostname and a volume see each other's files, not
each other's pids).

The endpoint gives no thread to a connection: one thread reads requests from
every connection without blocking, answers each complete one, and closes a
connection that stays quiet past ``READ_TIMEOUT_S``; past ``MAX_CONNECTIONS``
the one idle longest is closed. Idle or slow clients cost a descriptor and a
little buffer each, never a thread, and scrapes are still answered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import selectors
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Metric,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.registry import Collector

from ctxtrace.telemetry.pids import alive

if TYPE_CHECKING:
    from ctxtrace._config import Config

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WILDCARDS = frozenset(("", "0.0.0.0", "::"))

#: Largest file clean-up reads: a target file of ours is well under 1 KiB.
MAX_TARGET_FILE: Final = 64 * 1024
#: Most entries of the folder clean-up looks at, in one start.
MAX_SCAN: Final = 10_000


class UnsafeFolder(Exception):
    """The targets folder works, but others than its owner can write it."""


def check_folder(folder: str | Path) -> None:
    """Make the targets folder if needed; raise ``OSError`` if it cannot hold target files.

    Raises ``UnsafeFolder`` (after every other check passed) when anyone may
    write the folder: they could plant target files (Prometheus would scrape
    what they name) or delete ours.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    status = os.stat(path)
    if not stat.S_ISDIR(status.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))
    if status.st_mode & stat.S_IWOTH:
        sticky = " (sticky)" if status.st_mode & stat.S_ISVTX else ""
        raise UnsafeFolder(f"writable by every user{sticky}: mode {stat.filemode(status.st_mode)}")


def target_file_name(worker: str) -> str:
    """``host:pid:role`` made safe for any file system: ``host_pid_role.json``."""
    return _UNSAFE.sub("_", worker) + ".json"


def open_small_file(path: Path, limit: int = MAX_TARGET_FILE) -> int | None:
    """A descriptor of ``path`` if it is a regular file of ``limit`` bytes at most (no link
    followed, no wait)."""
    try:
        # Not even opened unless it is a regular file (a device's open can act).
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        # O_NONBLOCK: should it have become a FIFO since, opening it must not wait.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode) and status.st_size <= limit:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _owner(fd: int) -> tuple[str, int] | None:
    """``(host, pid)`` of the worker a target file names, if it is one of ours."""
    try:
        data = os.pread(fd, MAX_TARGET_FILE + 1, 0)
        groups = json.loads(data.decode("utf-8"))
        worker = groups[0]["labels"]["worker"]
        host, pid, _role = str(worker).split(":")
        return host, int(pid)
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None


def locked_by_someone(fd: int) -> bool:
    """Whether a live process holds the lock its worker takes on its own file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # a file system without locks: nothing tells, so nothing goes
    return False


def remove_stale(folder: Path, host: str) -> list[Path]:
    """Delete target files of this host's workers that no live process holds.

    A file goes only when nobody holds its lock and its pid names no process
    here either: a live worker's file is never taken, whatever namespace it runs in.
    """
    removed: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            names = [e.name for _, e in zip(range(MAX_SCAN), entries, strict=False)]
    except OSError:
        return removed
    for name in sorted(n for n in names if n.endswith(".json") and not n.startswith(".")):
        path = folder / name
        fd = open_small_file(path)
        if fd is None:
            continue
        try:
            owner = _owner(fd)
            if owner is None or owner[0] != host or owner[1] == os.getpid():
                continue
            # The lock says it for workers of this version anywhere; the pid, for
            # files of earlier versions (no lock) whose worker runs in our namespace.
            if locked_by_someone(fd) or alive(owner[1]):
                continue
            # Only the file we judged: if another took its name meanwhile, it stays.
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class Endpoint:
    """A running ``/metrics`` server and, optionally, its target file."""

    def __init__(self, server: Any, thread: threading.Thread, address: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.address = address
        self.port = port
        self.target_file: Path | None = None
        self._lock_fd: int | None = None
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
        """Write (atomically, safely) the file_sd entry for this endpoint; stale ones go first.

        The new file's descriptor stays open with an ``flock`` on it until the
        endpoint closes or the process dies: that lock is what tells other
        workers this one lives.
        """
        folder.mkdir(parents=True, exist_ok=True)
        host = worker.split(":", 1)[0]
        remove_stale(folder, host)
        path = folder / target_file_name(worker)
        payload = json.dumps([{"targets": [self.target], "labels": {"worker": worker}}])
        # mkstemp: a name nobody can predict, made with O_EXCL|O_NOFOLLOW, mode 0600.
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o644)  # Prometheus may run as another user
            os.write(fd, payload.encode("utf-8"))
            os.replace(temporary, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        previous, self.target_file = self.target_file, path
        old_fd, self._lock_fd = self._lock_fd, fd
        if previous is not None and previous != path:
            self._remove(previous, old_fd)
        elif old_fd is not None:
            os.close(old_fd)
        return path

    def rename(self, worker: str) -> None:
        """The worker's label changed (its role became known): the file follows."""
        if self.target_file is not None and os.getpid() == self._pid:
            self.write_target_file(self.target_file.parent, worker)

    def _remove(self, path: Path, fd: int | None) -> None:
        """Delete our target file (if it still is ours), then let go of its lock."""
        try:
            if fd is not None and os.stat(path, follow_symlinks=False).st_ino == os.fstat(
                fd
            ).st_ino:
                path.unlink()
        except OSError:
            pass
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop serving and remove the target file (in the process that made them)."""
        if os.getpid() != self._pid:
            self.abandon()
            return
        try:
            self.server.shutdown(timeout_s)
            self.thread.join(timeout_s)
        finally:
            path, self.target_file = self.target_file, None
            fd, self._lock_fd = self._lock_fd, None
            if path is not None:
                self._remove(path, fd)

    def abandon(self) -> None:
        """In a forked child: close the inherited socket and lock; the file is the parent's.

        The lock's descriptor must go too: a child holding it would keep the
        parent's file looking alive after the parent died.
        """
        self.target_file = None
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.server.abandon()


#: Seconds a connection may take to send a whole request; then it is closed.
READ_TIMEOUT_S: Final = 10.0
#: Seconds a response may take to be read by the client.
WRITE_TIMEOUT_S: Final = 10.0
#: Connections kept open at once; past this the one idle longest is closed.
MAX_CONNECTIONS: Final = 64
#: Largest request head (request line and headers) accepted.
MAX_REQUEST: Final = 8 * 1024
#: Seconds between the serving thread's checks for a stop and for timeouts.
POLL_S: Final = 0.1


class _Connection:
    __slots__ = ("deadline", "inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox: bytes | None = None
        self.deadline = now + READ_TIMEOUT_S


class MetricsServer:
    """A ``/metrics`` server on one thread: no thread per connection, every wait bounded."""

    def __init__(self, app: Any, family: int, address: tuple[Any, ...]) -> None:
        self.app = app
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.socket.bind(address)
            self.socket.listen(128)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._connections: dict[socket.socket, _Connection] = {}
        self._stop = threading.Event()
        self.served = 0

    # -- the loop -----------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(POLL_S):
                    if self._stop.is_set():
                        break
                    sock = key.fileobj
                    if sock is self.socket:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        connection = self._connections.get(sock)  # type: ignore[call-overload]
                        if connection is not None:
                            self._ready(connection, events)
                self._expire(time.monotonic())
        finally:
            for sock in list(self._connections):
                self._drop(sock)
            with contextlib.suppress(Exception):
                self._selector.close()
            for sock in (self.socket, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors, or the client went: try again later
            sock.setblocking(False)
            if len(self._connections) >= MAX_CONNECTIONS:
                oldest = min(self._connections.values(), key=lambda c: c.deadline)
                self._drop(oldest.sock)
            connection = _Connection(sock, time.monotonic())
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, None)

    def _ready(self, connection: _Connection, events: int) -> None:
        sock = connection.sock
        try:
            if connection.outbox is None and events & selectors.EVENT_READ:
                data = sock.recv(4096)
                if not data:
                    self._drop(sock)
                    return
                connection.inbox += data
                if b"\r\n\r\n" in connection.inbox or b"\n\n" in connection.inbox:
                    connection.outbox = self._respond(connection.inbox)
                    connection.deadline = time.monotonic() + WRITE_TIMEOUT_S
                    self._selector.modify(sock, selectors.EVENT_WRITE, None)
                elif len(connection.inbox) > MAX_REQUEST:
                    self._drop(sock)
                    return
            if connection.outbox is not None:
                sent = sock.send(connection.outbox)
                connection.outbox = connection.outbox[sent:]
                if not connection.outbox:
                    self.served += 1
                    self._drop(sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sock)

    def _respond(self, request: bytes) -> bytes:
        """The whole response to one request head (``Connection: close``)."""
        head = request.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", [], b"bad request\n")
        method, target, _version = parts
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "SERVER_NAME": str(self.server_address[0]),
            "SERVER_PORT": str(self.server_address[1]),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
        }
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        reply: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            reply[:] = [status, headers]

        try:
            body = b"".join(self.app(environ, start_response))
            status, headers = reply
        except Exception:
            return _response("500 Internal Server Error", [], b"metrics unavailable\n")
        return _response(status, headers, body)

    def _expire(self, now: float) -> None:
        for sock, connection in list(self._connections.items()):
            if connection.deadline <= now:
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._connections.pop(sock, None)
        with contextlib.suppress(Exception):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()

    # -- control ------------------------------------------------------------

    def connections(self) -> int:
        return len(self._connections)

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop the loop; it closes every socket on its way out."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def abandon(self) -> None:
        """In a forked child: close the inherited sockets (the loop's thread is not here)."""
        for sock in (self.socket, self._wake_r, self._wake_w, *self._connections):
            with contextlib.suppress(OSError):
                sock.close()
        self._connections = {}


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _listen(registry: Any, host: str, port: int) -> tuple[MetricsServer, threading.Thread]:
    """A metrics server on ``host:port`` and its serving thread, started."""
    family, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0][::4]
    server = MetricsServer(make_wsgi_app(registry), family, address)
    thread = threading.Thread(
        target=server.serve_forever, name="ctxtrace-prometheus", daemon=True
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


class WorkerLabelled(Collector):
    """A registry's families, every sample with this process's ``worker`` label.

    The OpenTelemetry series have theirs already; prometheus_client's process
    metrics and ``target_info`` get it here. On one address per host it is what
    tells the processes apart (file_sd used to add it as a target label), and the
    alert rules join each worker's ``process_start_time_seconds`` on it. ``worker``
    changes when a process learns its role after it started.
    """

    def __init__(self, registry: Any, worker: str) -> None:
        self._registry = registry
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        for family in self._registry.collect():
            family.samples = [
                s if "worker" in s.labels else s._replace(labels={**s.labels, "worker": worker})
                for s in family.samples
            ]
            yield family


def registry_of(collector: Collector) -> CollectorRegistry:
    """A registry serving ``collector`` (what ``make_wsgi_app`` wants)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def reader(worker: str) -> tuple[WorkerLabelled, PrometheusMetricReader]:
    """A Prometheus reader on a registry of its own, with the process metrics, labelled."""
    # A registry per reader: restarts (and forks) make several in one process,
    # and one registry would serve them all at once.
    registry: Any = CollectorRegistry(auto_describe=False)
    try:
        pull = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    except TypeError:
        # Exporter releases before the ``registry`` keyword (spring 2026) always
        # register in the default registry; an abandoned reader must then be shut
        # down (unregistered) before the next one starts.
        return WorkerLabelled(REGISTRY, worker), PrometheusMetricReader()
    add_process_metrics(registry)
    return WorkerLabelled(registry, worker), pull


def serve(labelled: WorkerLabelled, config: Config) -> Endpoint:
    """This worker's own endpoint, not announced yet (``announce``)."""
    return bind(registry_of(labelled), config.prometheus_host, config.prometheus_port)


def announce(endpoint: Endpoint, worker: str, config: Config) -> None:
    """Write ``endpoint``'s file_sd target file, if a folder is configured.

    Called once the instruments it serves exist: a scraper that found the file
    before then would get the process metrics without a single ctxtrace series.
    """
    if config.prometheus_targets_dir:
        endpoint.write_target_file(Path(config.prometheus_targets_dir), worker)
