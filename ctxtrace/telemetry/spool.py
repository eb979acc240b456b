"""One process's series, written to the folder the host's ``/metrics`` serves from.

Each process ctxtrace runs in (the gunicorn master and its workers, Celery's pool
processes, RQ's work-horses) writes what its own ``/metrics`` would answer into
``<folder>/<worker>.prom``, in Prometheus's text format: node_exporter's textfile
convention, written with prometheus_client's ``write_to_textfile`` (a temporary
file renamed into place, so a reader never sees half a file). The process that
serves the host's address (``hostscrape.py``) reads these files back with
prometheus_client's parser. Every series carries its ``worker`` label in the
file (``prometheus.WorkerLabelled``).

Whether a file's process lives is told by a lock, as for the file_sd targets:
each writer holds an ``flock`` on ``.<worker>.lock`` from its first write to its
end, and the kernel lets go of it when the process dies, however it dies
(``os._exit`` included).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Final

from prometheus_client import write_to_textfile
from prometheus_client.registry import Collector

from ctxtrace.telemetry.prometheus import target_file_name

#: The suffix of a process's file (node_exporter's textfile collector reads the same).
SUFFIX: Final = ".prom"
#: Attempts, a millisecond apart, at a process's own lock before a write gives up.
LOCK_TRIES: Final = 100


def spool_name(worker: str) -> str:
    """``host:pid:role`` made safe for any file system: ``host_pid_role.prom``."""
    return target_file_name(worker).removesuffix(".json") + SUFFIX


def lock_name(name: str) -> str:
    """The lock file beside a process's file (hidden: no reader takes it for one)."""
    return f".{name.removesuffix(SUFFIX)}.lock"


class Spool:
    """This process's file in the folder, and the lock that says the process lives."""

    def __init__(self, folder: Path, source: Collector, worker: str) -> None:
        self.folder = folder
        self._source = source
        self.name = spool_name(worker)
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        # A write (the metrics thread) and a rename or close (the process's own
        # thread) take turns: a write in flight during a rename would bring the old
        # file back without its lock, served as an ended process for the retention.
        # Reentrant: a signal handler that stops the agent may interrupt a write of
        # its own thread.
        self._turn = threading.RLock()

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def write(self) -> None:
        """Collect and replace the file (the lock is taken first, at the first write)."""
        if os.getpid() != self._pid:
            return
        with self._turn:
            if self._lock_fd is None:
                self._lock_fd = self._lock(self.folder / lock_name(self.name))
            write_to_textfile(str(self.path), self._source)

    @staticmethod
    def _lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # The server holds it only for a look (a shared lock, microseconds); a
            # holder that keeps it longer costs this write, never the metrics thread.
            for _ in range(LOCK_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    time.sleep(0.001)
                else:
                    return fd
            raise TimeoutError(f"{path} stays locked by another process")
        except BaseException:
            os.close(fd)
            raise

    def rename(self, worker: str) -> None:
        """The process's label changed: the next write goes to its new file, the old one goes."""
        name = spool_name(worker)
        if name == self.name or os.getpid() != self._pid:
            return
        with self._turn:
            self._let_go(remove=True)
            self.name = name

    def close(self, *, remove: bool = False) -> None:
        """Let go of the lock; with ``remove``, delete the file first (else it stays as the
        last word of a process that ended, and the host serves it for a while).

        In a forked child only the inherited descriptor is closed: the file and the
        lock are the parent's (closing is not unlocking; an unlock here would drop
        the parent's lock too).
        """
        if os.getpid() != self._pid:
            # The lock may have been held by a thread that the fork left behind.
            self._let_go(remove=False)
            return
        with self._turn:
            self._let_go(remove=remove)

    def _let_go(self, *, remove: bool) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if remove:
            for name in (self.name, lock_name(self.name)):
                with contextlib.suppress(OSError):
                    (self.folder / name).unlink()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
