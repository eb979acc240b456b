"""The ``/metrics`` endpoint under idle and slow clients (issue 16, item 3).

Every connection used to get a thread of the application's process, with no
timeout: enough idle clients break the app's own ``Thread.start()``. Now the
threads and memory stay bounded, idle connections are closed, and scrapes are
still answered while hundreds of clients hold connections open.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from ctxtrace.telemetry import prometheus as _prometheus

IDLE = 400
SLOW = 50


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def endpoint() -> Iterator[Any]:
    registry = CollectorRegistry()
    Counter("scrapes_seen", "a sample to find", registry=registry).inc()
    served = _prometheus.bind(registry, "127.0.0.1", (0, 0))
    yield served
    served.close(2.0)


def _scrape(port: int, timeout: float = 5.0) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def test_idle_and_slow_clients_cost_no_threads_and_scrapes_still_answer(endpoint: Any) -> None:
    """400 idle and 50 slow (a byte at a time) connections: no thread each, scrapes answered."""
    threads_before = threading.active_count()
    rss_before = _rss_kib()
    clients: list[socket.socket] = []
    try:
        for _ in range(IDLE + SLOW):
            clients.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # bounded: a few rounds of slow bytes
            for slow in clients[IDLE:]:
                with contextlib.suppress(OSError):
                    slow.send(b"G")
            assert "scrapes_seen_total 1.0" in _scrape(endpoint.port, timeout=2)
            time.sleep(0.2)
        threads_during = threading.active_count()
        rss_during = _rss_kib()
    finally:
        for client in clients:
            client.close()
    assert threads_during - threads_before <= 1, (threads_before, threads_during)
    assert endpoint.server.connections() <= _prometheus.MAX_CONNECTIONS
    # The clients' own sockets are in this process too; the server's share is small.
    assert rss_during - rss_before < 8 * 1024, (rss_before, rss_during)
    assert "scrapes_seen_total 1.0" in _scrape(endpoint.port)


@pytest.fixture
def short_timeout_client(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A client connected to the endpoint, whose read timeout is cut to half a second."""
    monkeypatch.setattr(_prometheus, "READ_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as client:
        yield client


def test_an_idle_connection_is_closed_after_the_read_timeout(
    short_timeout_client: socket.socket,
) -> None:
    """A client that connects and says nothing is disconnected once its time is up."""
    started = time.monotonic()
    assert short_timeout_client.recv(1) == b""  # closed by the server, not by our timeout
    assert time.monotonic() - started < 3


def test_a_trickling_client_is_not_kept_alive_by_its_bytes(
    short_timeout_client: socket.socket,
) -> None:
    """The read timeout covers the whole request: sending a byte now and then does not extend it."""
    slow = short_timeout_client
    started = time.monotonic()
    closed = False
    for _ in range(40):  # at most 4 s
        try:
            slow.send(b"G")
        except OSError:
            closed = True
            break
        time.sleep(0.1)
        slow.setblocking(False)
        try:
            closed = slow.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed = True
        slow.setblocking(True)
        if closed:
            break
    assert closed and time.monotonic() - started < 2.5


def test_requests_answer_as_before(endpoint: Any) -> None:
    """GET on any path, OPTIONS, other methods and junk: what prometheus_client's app says."""
    assert "scrapes_seen_total" in _scrape(endpoint.port)

    def raw(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as client:
            client.sendall(request)
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

    def status(request: bytes) -> int:
        return int(raw(request).split(b" ", 2)[1])

    assert status(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n") == 200
    assert status(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == 405
    assert status(b"nonsense\r\n\r\n") == 400
    gzipped = raw(b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
    assert b"Content-Encoding: gzip" in gzipped
    too_long = raw(b"GET /" + b"a" * (_prometheus.MAX_REQUEST + 10))
    assert too_long == b""
