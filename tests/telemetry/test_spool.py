"""A process's file for the host's /metrics: every series labelled, a lock while it lives."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Metric

from ctxtrace.telemetry.prometheus import WorkerLabelled
from ctxtrace.telemetry.spool import Spool, lock_name, spool_name

from .._exposition import series, small_registry


def _registry() -> CollectorRegistry:
    return small_registry(3)


def _held(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_every_series_carries_its_worker(tmp_path: Path) -> None:
    """Series without a worker label get the process's, read at each write."""
    labelled = WorkerLabelled(_registry(), "h:1:process")
    spool = Spool(tmp_path, labelled, "h:1:process")
    spool.write()
    assert spool.path == tmp_path / "h_1_process.prom"
    labelled.worker = "h:1:gunicorn"
    spool.write()
    assert series(spool.path.read_text()) == {
        ("ctxtrace_contexts_total", (("kind", "request"), ("worker", "h:1:gunicorn"))): 3.0,
        ("process_start_time_seconds", (("worker", "h:1:gunicorn"),)): 3.0,
    }
    spool.close()


def test_lock_held_while_the_writer_lives(tmp_path: Path) -> None:
    """From the first write to close the lock is held; the file stays after close."""
    spool = Spool(tmp_path, _registry(), "h:2:gunicorn")
    lock = tmp_path / lock_name(spool.name)
    assert not lock.exists()
    spool.write()
    assert _held(lock)
    spool.close()
    assert not _held(lock) and spool.path.exists()


def test_rename_moves_the_file(tmp_path: Path) -> None:
    """A label learnt late: the old file and lock go, the next write makes the new ones."""
    spool = Spool(tmp_path, _registry(), "h:3:process")
    spool.write()
    spool.rename("h:3:gunicorn-master")
    spool.write()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [spool_name("h:3:gunicorn-master"), lock_name(spool_name("h:3:gunicorn-master"))]
    )
    spool.close(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_forked_child_closing_keeps_the_parents_lock(tmp_path: Path) -> None:
    """A child that closes its inherited copy neither unlocks nor deletes the parent's file."""
    spool = Spool(tmp_path, _registry(), "h:4:gunicorn-master")
    spool.write()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only closes and leaves
        spool.close(remove=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _held(tmp_path / lock_name(spool.name)) and spool.path.exists()
    spool.close()


def test_a_lock_held_by_another_costs_the_write_not_the_thread(tmp_path: Path) -> None:
    """Someone keeping the writer's lock: the write fails within a bound, then succeeds."""
    spool = Spool(tmp_path, _registry(), "h:5:gunicorn")
    lock = tmp_path / lock_name(spool.name)
    lock.write_text("")
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        with pytest.raises(TimeoutError):
            spool.write()
        assert not spool.path.exists()
    finally:
        os.close(fd)
    spool.write()
    assert spool.path.exists() and _held(lock)
    spool.close()


class _SlowCollector:
    """A collector that waits, mid-collection, until the test lets it go on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def collect(self) -> Iterator[Metric]:
        self.entered.set()
        self.go_on.wait(10)
        yield from _registry().collect()


def test_a_rename_during_a_write_leaves_no_file_under_the_old_name(tmp_path: Path) -> None:
    """The metrics thread writes while the main thread renames the process (gunicorn's
    master under ``ctxtrace run``): the old name must not come back, lockless, to be
    served as a second, ended process for the retention time."""
    source = _SlowCollector()
    spool = Spool(tmp_path, source, "h:3:process")
    source.go_on.set()
    spool.write()  # the first write takes the lock
    source.go_on.clear()
    source.entered.clear()
    writer = threading.Thread(target=spool.write)
    writer.start()
    assert source.entered.wait(10)
    renamer = threading.Thread(target=spool.rename, args=("h:3:gunicorn-master",))
    renamer.start()
    renamer.join(0.2)  # the rename waits for the write in flight (or, unfixed, is done)
    source.go_on.set()
    writer.join(10)
    renamer.join(10)
    spool.write()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        spool_name("h:3:gunicorn-master")
    ]
    spool.close()
