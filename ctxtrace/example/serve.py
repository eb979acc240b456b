"""Serve the example shop with ctxtrace on in every worker: the launch path of ``ctxtrace demo``.

:func:`start_server` runs ``ctxtrace run -- gunicorn -k gthread ... ctxtrace.example.wsgi:app``
on a free port of 127.0.0.1 (a threaded werkzeug server instead when gunicorn cannot be
imported) and returns a :class:`Server` once every worker serves requests and has registered
its ``/metrics`` endpoint. ``ctxtrace run`` is ctxtrace's own zero-code path: the server
process and every worker it forks run with the agent on and the embedded default exporters,
anomalies as JSON lines on stderr and metrics on each worker's own Prometheus endpoint (the
first free port of ``CTXTRACE_PROMETHEUS_PORT``), each announced by a file_sd target file in
``<out_dir>/targets``, which a Prometheus ``file_sd_configs`` job can watch::

    from ctxtrace.example.serve import start_server

    with start_server(tmp_path, workers=2) as server:
        urllib.request.urlopen(server.url + "/items")
        endpoints = server.targets()          # {worker id: "127.0.0.1:PORT"}
    # stopped: every process it started is gone, by pid

All output of the server (gunicorn's lines, the app's warnings, ctxtrace's JSON lines) goes to
``<out_dir>/server.log``. ``python -m ctxtrace.example.serve --port N`` is the werkzeug
server the fallback runs (it is not meant to be started by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from . import create_app

ServerKind = Literal["gunicorn", "werkzeug"]

HOST: Final = "127.0.0.1"
#: The ``ctxtrace`` console script, run through this interpreter so it need not be on PATH.
_CTXTRACE: Final = "import sys; from ctxtrace.cli import main; sys.exit(main())"
#: Environment variables a demo server keeps from the caller: where metrics may listen.
_KEPT: Final = ("CTXTRACE_PROMETHEUS_PORT",)


def gunicorn_available() -> bool:
    """Whether gunicorn can be imported by this interpreter."""
    return importlib.util.find_spec("gunicorn") is not None


def _gunicorn_version() -> tuple[int, ...]:
    numbers = re.findall(r"\d+", importlib.metadata.version("gunicorn"))[:2]
    return tuple(int(part) for part in numbers)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_targets(folder: Path) -> dict[str, str]:
    """The file_sd target files in ``folder``: ``{worker id: "host:port"}``."""
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            (entry,) = json.loads(path.read_text(encoding="utf-8"))
            found[str(entry["labels"]["worker"])] = str(entry["targets"][0])
        except (OSError, ValueError, LookupError, TypeError):
            continue  # being written, or removed meanwhile
    return found


def worker_pid(worker: str) -> int:
    """The pid in a worker id ``host:pid:role``."""
    return int(worker.split(":")[1])


@dataclass
class Server:
    """A running example shop: where it answers, which processes serve it, how to stop it."""

    kind: ServerKind
    url: str
    process: subprocess.Popen[bytes]
    targets_dir: Path
    log_path: Path
    #: The processes that serve requests: the gunicorn workers, or the werkzeug process.
    pids: tuple[int, ...] = ()
    _stopped: bool = field(default=False, repr=False)

    @property
    def master_pid(self) -> int:
        """The process :func:`start_server` started (gunicorn's master under gunicorn)."""
        return self.process.pid

    def targets(self) -> dict[str, str]:
        """Every ``/metrics`` endpoint now registered, master included: ``{worker: host:port}``.

        Read it before :meth:`stop`: each process removes its file when it exits.
        """
        return read_targets(self.targets_dir)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server, wait (bounded), then SIGKILL whatever of it is left, by pid.

        Returns the server's exit status (None if it had to be killed). Safe to call again,
        also after an interrupted call (a second Ctrl-C): it then finishes the job.
        """
        if self._stopped:
            return self.process.returncode
        status: int | None = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(5)
        # gunicorn stops its workers before it exits; one that outlived it (a master killed
        # above) is stopped here by its own pid.
        deadline = time.monotonic() + 5.0
        for pid in self.pids:
            if pid == self.process.pid:
                continue
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._stopped = True
        return status

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def server_environment(
    environ: Mapping[str, str], targets_dir: Path, options: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The environment and ``ctxtrace run --set`` options for a demo server.

    Leaves out the caller's other ``CTXTRACE_*`` and ``OTEL_*`` settings so the server runs
    on the embedded defaults whatever the shell has set; keeps ``CTXTRACE_PROMETHEUS_PORT``,
    the port range the workers' endpoints may use.
    """
    env = {
        key: value
        for key, value in environ.items()
        if not key.startswith(("CTXTRACE_", "OTEL_")) or key in _KEPT
    }
    settings = {"prometheus_host": HOST, "prometheus_targets_dir": str(targets_dir), **options}
    return env, [f"--set={key}={value}" for key, value in settings.items()]


def _command(kind: ServerKind, port: int, workers: int, threads: int) -> list[str]:
    if kind == "werkzeug":
        return [
            sys.executable, "-m", "ctxtrace.example.serve",
            "--port", str(port), "--threads", str(threads),
        ]
    command = [
        sys.executable, "-m", "gunicorn",
        "--workers", str(workers), "--worker-class", "gthread", "--threads", str(threads),
        "--bind", f"{HOST}:{port}", "--graceful-timeout", "5", "--keep-alive", "5",
    ]
    if _gunicorn_version() >= (27, 0):
        # gunicorn 27 opens a control socket in ~/.gunicorn by default; two servers collide.
        command.append("--no-control-socket")
    return [*command, "ctxtrace.example.wsgi:app"]


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        response.read()
        return int(response.status)


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-size:]
    except OSError:
        return ""


def start_server(
    out_dir: Path | str,
    workers: int = 2,
    *,
    threads: int = 2,
    server: ServerKind | Literal["auto"] = "auto",
    options: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """Start the example shop with ctxtrace on; return once every worker is ready.

    ``out_dir`` receives ``server.log`` (everything the server prints) and ``targets/``
    (the workers' file_sd target files). ``server="auto"`` is gunicorn with ``workers``
    gthread workers of ``threads`` threads when gunicorn is importable, else one threaded
    werkzeug process. ``options`` are further ctxtrace options (``{"log_rate_window":
    "10"}``); none by default: ctxtrace's own defaults. Raises ``RuntimeError`` (with the
    end of the server's output) if it does not come up within ``timeout`` seconds; nothing
    is left running then.
    """
    out = Path(out_dir)
    auto: ServerKind = "gunicorn" if gunicorn_available() else "werkzeug"
    kind: ServerKind = auto if server == "auto" else server
    targets_dir = out / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    log_path = out / "server.log"
    log_path.write_bytes(b"")  # this server's output only, even in a reused folder
    env, settings = server_environment(os.environ, targets_dir, options or {})
    expected = workers + 1 if kind == "gunicorn" else 1
    last_error = ""
    for _attempt in range(3):
        port = _free_port()
        command = [
            sys.executable, "-c", _CTXTRACE, "run", *settings, "--",
            *_command(kind, port, workers, threads),
        ]
        with open(log_path, "ab") as log:
            # A session of its own: a Ctrl-C in the terminal reaches the caller, which then
            # stops the server in order, instead of killing it halfway through a request.
            process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        handle = Server(kind, f"http://{HOST}:{port}", process, targets_dir, log_path)
        try:
            if _wait_ready(handle, expected, timeout):
                return handle
        except BaseException:
            handle.stop(5)
            raise
        handle.stop(5)
        last_error = _tail(log_path)
        if "in use" not in last_error:
            break  # not a port race: another attempt would fail the same way
    raise RuntimeError(f"the example server did not start ({kind}); its output:\n{last_error}")


def _wait_ready(handle: Server, expected: int, timeout: float) -> bool:
    """Poll (bounded) until ``expected`` processes registered and the server answers."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if handle.process.poll() is not None or time.monotonic() > deadline:
            return False
        registered = handle.targets()
        if len(registered) >= expected:
            try:
                answered = _get(handle.url + "/") == 200
            except (OSError, urllib.error.URLError):
                answered = False
            if answered:
                handle.pids = tuple(
                    sorted(
                        pid
                        for pid in map(worker_pid, registered)
                        if pid != handle.process.pid or expected == 1
                    )
                )
                return True
        time.sleep(0.05)
    return False


def _serve_werkzeug(argv: Sequence[str] | None = None) -> None:
    """The fallback server: one process, a fixed pool of threads that serve every request.

    werkzeug's own threaded server starts a thread per request (it closes every connection),
    so nothing a request leaves on its thread could reach a later one; a pool of long-lived
    threads is what gunicorn's gthread workers and most production servers have.
    """
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 (fallback only)

    from werkzeug.serving import BaseWSGIServer  # noqa: PLC0415 (fallback only)

    class PooledServer(BaseWSGIServer):
        multithread = True

        def __init__(self, port: int, threads: int) -> None:
            super().__init__(HOST, port, create_app())
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="werkzeug-worker")

        def process_request(self, request: Any, client_address: Any) -> None:
            self.pool.submit(self._serve, request, client_address)

        def _serve(self, request: Any, client_address: Any) -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    parser = argparse.ArgumentParser(prog="python -m ctxtrace.example.serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    server = PooledServer(args.port, args.threads)
    # SIGTERM ends it like Ctrl-C would, so the agent flushes and removes its target file.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    _serve_werkzeug()
