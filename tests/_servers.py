"""Real servers and workers for the integration tests: started on free loopback ports,
stopped by pid, every wait bounded in time.

redis-server comes from Debian (``apt-get install -y --no-install-recommends
redis-server``; ``.ci/run`` installs it). Missing on a laptop, the tests that need
it skip and say so; missing in CI (``CI`` set), they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.serving import make_server

REPO = Path(__file__).resolve().parents[1]
#: The test run's own virtualenv scripts (``ctxtrace``, ``gunicorn``).
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(size: int) -> tuple[int, int]:
    """`size` consecutive ports that are all free now, below Linux's ephemeral range.

    Every request and scrape of a run leaves a client port in TIME_WAIT, and those come
    from the ephemeral range (32768 and up): a range picked there is soon half taken.
    The probe binds the way the agent's server does (SO_REUSEADDR), so a port that only
    an old connection's TIME_WAIT holds counts as free, as it is for the agent.
    """
    rng = random.Random()
    for _ in range(100):
        low = rng.randrange(20000, 32768 - size)
        with contextlib.ExitStack() as probes:
            try:
                for port in range(low, low + size):
                    sock = probes.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return low, low + size - 1
    pytest.fail(f"no {size} consecutive free ports on 127.0.0.1 in 20000-32767")


def wait_until(
    check: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str
) -> Any:
    """Poll ``check`` until it returns something truthy: bounded in time and in count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)


def run_threads(threads: list[threading.Thread], *, timeout: float, what: str) -> None:
    """Start every thread and join them all within one deadline; fail if any still runs."""
    for thread in threads:
        thread.start()
    join_threads(threads, timeout=timeout, what=what)


def join_threads(threads: list[threading.Thread], *, timeout: float, what: str) -> None:
    """Join every thread within one deadline; fail, naming ``what``, if any still runs."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    assert not stuck, f"{what} still running after {timeout:g} s: {stuck}"


def stop(process: subprocess.Popen[Any], *, grace: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``grace``; ``group``: the process leads a session we
    started, whose stragglers (pool processes, work-horses) are killed too."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def server_binary(name: str, package: str) -> str:
    """The path of a server the tests start, from Debian's ``package``.

    Missing, the test skips with the install command on a laptop and fails in CI (``CI``
    set), where a skip would hide a check that never ran.
    """
    path = shutil.which(name)
    if path is None:
        hint = f"apt-get install -y --no-install-recommends {package}"
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, and CI is set: {hint}", pytrace=False)
        pytest.skip(f"{name} is not installed ({hint})")
    return path


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1; yields its URL."""
    binary = server_binary("redis-server", "redis-server")
    for _attempt in range(3):
        port = free_port()
        log = tmp / f"redis-{port}.log"
        process = subprocess.Popen(
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no",
                "--logfile", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

        def ping(process: subprocess.Popen[bytes] = process, client: Any = client) -> bool:
            if process.poll() is not None:
                return True  # exited: the port was taken meanwhile, try another
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            wait_until(ping, timeout=10, what=f"redis-server on port {port}")
            if process.poll() is None:
                break
        finally:
            client.close()
    else:
        pytest.fail(f"redis-server would not start: {log.read_text()[-2000:]}", pytrace=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process, grace=5)


def python(*args: str, env: Mapping[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python args...`` from the repository root in a session of its own (stop it
    with ``stop(process, group=True)``), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def werkzeug_server(app: Any, *, timeout: float = 10.0) -> Iterator[int]:
    """werkzeug's threaded server (a thread per request) on a free loopback port; yields
    the port. Stopping waits up to ``timeout`` for the serving thread."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="werkzeug-server")
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout)


def wait_for_request_threads(timeout: float) -> None:
    """werkzeug's request threads answer before their last line runs; let them all end."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if "process_request_thread" in thread.name:
            thread.join(max(0.0, deadline - time.monotonic()))


def file_sd_targets(folder: Path) -> dict[int, dict[str, Any]]:
    """The file_sd entries in ``folder``, by the pid of the worker they name."""
    found: dict[int, dict[str, Any]] = {}
    for path in folder.glob("*.json"):
        try:
            (entry,) = json.loads(path.read_text())
        except (ValueError, OSError):
            continue  # being written
        found[int(entry["labels"]["worker"].split(":")[1])] = entry
    return found


def assert_prints_ok(script: str) -> None:
    """Run ``script`` in a fresh interpreter (nothing imported yet) and expect ``ok``."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr


def checkout_env() -> dict[str, str]:
    """The environment for a child that runs this checkout's ctxtrace (not an installed
    one), with no ``CTXTRACE_*`` or ``OTEL_*`` setting inherited from the test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXTRACE_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def ctxtrace_run(
    command: Sequence[str], log: Path, *, sets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``ctxtrace run [--set OPTION]... -- COMMAND`` from the repository root, in a session
    of its own (stop it with ``stop(..., group=True)``), output to ``log``; ``env`` on top
    of ``checkout_env()``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                str(BIN / "ctxtrace"), "run",
                *(item for option in sets for item in ("--set", option)),
                "--", *command,
            ],
            cwd=REPO, env={**checkout_env(), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def ctxtrace_gunicorn(
    folder: Path, app: str, *options: str, sets: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str, Path, Path]:
    """``ctxtrace run -- gunicorn --preload OPTIONS app`` on a free loopback port.

    Every process's ``/metrics`` takes a port the OS picks and announces it in a file_sd
    folder; ``sets`` and ``env`` as for ``ctxtrace_run``. Returns the process, its base
    URL, the file_sd folder and the log (gunicorn's lines and ctxtrace's JSON).
    """
    port, targets, log = free_port(), folder / "targets", folder / "gunicorn.log"
    command = [
        str(BIN / "gunicorn"), "--preload", *options,
        "--no-control-socket", "--graceful-timeout", "10", "-b", f"127.0.0.1:{port}", app,
    ]
    process = ctxtrace_run(
        command, log, env=env,
        sets=("prometheus_port=0", f"prometheus_targets_dir={targets}", *sets),
    )
    return process, f"http://127.0.0.1:{port}", targets, log
