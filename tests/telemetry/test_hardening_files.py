"""The file_sd targets folder is not trusted: others may write it (issue 16, items 1 and 2).

A hostile user who can write the folder must not make ctxtrace overwrite a file
through a link, hang on a FIFO, or read a huge file; a live worker's target file
is never removed, whatever PID namespace the worker runs in.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ctxtrace import _agent
from ctxtrace.telemetry import metrics as _metrics
from ctxtrace.telemetry import prometheus as _prometheus

from .._servers import REPO

OTEL_ENV = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME")


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OpenTelemetry exporter from the environment: only the local endpoint."""
    for name in OTEL_ENV:
        monkeypatch.delenv(name, raising=False)


def _host() -> str:
    return socket.gethostname().split(".", 1)[0][:40]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def _endpoint() -> Any:
    agent = _agent.current()
    assert agent is not None
    emitter = next(e for e in agent.emitters if isinstance(e, _metrics.MetricsEmitter))
    assert emitter.private is not None and emitter.private.endpoint is not None
    return emitter.private.endpoint


def _prometheus_on(instrumented: Any, folder: Path) -> Any:
    instrumented(metrics="prometheus", prometheus_port="0", prometheus_targets_dir=str(folder))
    return _endpoint()


def test_temp_file_is_not_written_through_a_planted_link(
    tmp_path: Path, instrumented: Any, clean_otel_env: None
) -> None:
    """Links at every temp name an attacker could predict leave their victims untouched."""
    victim = tmp_path / "victim"
    victim.write_text("root-owned secret")
    victim.chmod(0o600)
    folder = tmp_path / "targets"
    folder.mkdir()
    # The name the agent's worker id gives this process, with every role.
    for role in _prometheus_roles():
        name = _prometheus.target_file_name(f"{_host()}:{os.getpid()}:{role}")
        (folder / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    endpoint = _prometheus_on(instrumented, folder)
    assert victim.read_text() == "root-owned secret"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    written = endpoint.target_file
    assert written is not None and not written.is_symlink()
    assert json.loads(written.read_text())[0]["labels"]["worker"] == _agent.current().worker
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    # No temp file of ours is left behind; the planted links are not ours to remove.
    leftovers = {p.name for p in folder.iterdir()} - {written.name}
    assert all((folder / n).is_symlink() for n in leftovers)


def _prometheus_roles() -> tuple[str, ...]:
    """Every role a worker id can carry (README, "Metrics")."""
    return ("gunicorn", "gunicorn-master", "celery", "rq", "cli", "process")


_START = textwrap.dedent(
    """
    import resource, sys, time
    # A bound on memory: a file that never ends must not take the machine down.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    import ctxtrace
    started = time.monotonic()
    ctxtrace.instrument(metrics="prometheus", prometheus_port="0",
                        prometheus_targets_dir=sys.argv[1])
    print(round(time.monotonic() - started, 3), flush=True)
    ctxtrace.uninstrument()
    """
)


def test_a_fifo_or_endless_file_in_the_folder_does_not_hang_start_up(tmp_path: Path) -> None:
    """A FIFO, a link to /dev/zero and a big file named *.json: instrument() returns at once."""
    folder = tmp_path / "targets"
    folder.mkdir()
    os.mkfifo(folder / "fifo.json")
    (folder / "zero.json").symlink_to("/dev/zero")
    with (folder / "big.json").open("wb") as big:
        big.truncate(200 * 1024 * 1024)  # sparse: costs no disk
    env = {**os.environ, "OTEL_METRICS_EXPORTER": "", "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _START, str(folder)], capture_output=True, text=True,
            timeout=30, env=env, cwd=REPO, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("instrument() hung on the targets folder")
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[0]) < 5
    # The hostile entries are left alone (not ours to judge).
    assert stat.S_ISFIFO(os.lstat(folder / "fifo.json").st_mode)
    assert (folder / "zero.json").is_symlink()


def test_a_folder_others_can_write_is_warned_about(
    tmp_path: Path, instrumented: Any, clean_otel_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A world-writable targets folder works, with one warning line naming it."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    endpoint = _prometheus_on(instrumented, folder)
    assert endpoint.target_file is not None
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    [warning] = [x for x in lines if x["event"] == "ctxtrace.targets_dir_unsafe"]
    assert warning["key"] == "CTXTRACE_PROMETHEUS_TARGETS_DIR"
    # The value is shown cut to 80 characters: long temporary paths (pytest-xdist's) lose
    # their end.
    assert str(folder).startswith(warning["value"].strip("'").removesuffix("..."))
    assert "writable by every user" in warning["reason"]


_OTHER_NAMESPACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from prometheus_client import CollectorRegistry
    from ctxtrace.telemetry import prometheus as _prometheus
    # A worker in another PID namespace: its pid (argv[2]) names no process here.
    endpoint = _prometheus.bind(CollectorRegistry(), "127.0.0.1", (0, 0))
    endpoint.write_target_file(Path(sys.argv[1]), sys.argv[2])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_live_worker_of_another_pid_namespace_keeps_its_target(
    tmp_path: Path, instrumented: Any, clean_otel_env: None
) -> None:
    """Same host label, pid not visible here, process alive: its file stays; once dead, it goes."""
    folder = tmp_path / "targets"
    folder.mkdir()
    worker = f"{_host()}:{_dead_pid()}:gunicorn"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", _OTHER_NAMESPACE, str(folder), worker],
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    ) as other:
        try:
            assert other.stdout is not None
            assert other.stdout.readline().strip() == "ready"
            theirs = folder / _prometheus.target_file_name(worker)
            assert theirs.exists()
            _prometheus_on(instrumented, folder)
            assert theirs.exists(), "a live worker's target was removed"
            _agent.stop()
        finally:
            other.kill()
            other.wait(10)
    # Dead now (its lock went with it): the next worker to start removes the file.
    _prometheus_on(instrumented, folder)
    assert not theirs.exists()


def test_a_forked_child_does_not_keep_its_parents_target_alive(tmp_path: Path) -> None:
    """The lock's descriptor is closed in a forked child (abandon), so the parent's death shows."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    endpoint = _prometheus.bind(CollectorRegistry(), "127.0.0.1", (0, 0))
    try:
        path = endpoint.write_target_file(tmp_path, f"{_host()}:{_dead_pid()}:gunicorn")
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _prometheus.locked_by_someone(fd)
            endpoint.abandon()  # what a forked child does with the copy it inherited
            assert not _prometheus.locked_by_someone(fd)
        finally:
            os.close(fd)
    finally:
        endpoint.server.shutdown()
        endpoint.thread.join(5)


def test_a_target_folder_that_is_a_file_is_a_config_error(
    tmp_path: Path, no_agent: None
) -> None:
    """Checked at start-up: a folder that cannot be one raises, naming the variable."""
    import ctxtrace  # noqa: PLC0415

    not_a_folder = tmp_path / "passwd"
    not_a_folder.write_text("x")
    with pytest.raises(ctxtrace.ConfigError) as info:
        ctxtrace.instrument(metrics="prometheus", prometheus_targets_dir=str(not_a_folder))
    assert info.value.key == "CTXTRACE_PROMETHEUS_TARGETS_DIR"
    assert "directory" in str(info.value)
    assert not ctxtrace.is_instrumented()
