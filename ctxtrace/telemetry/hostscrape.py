"""The host's one ``/metrics``: every process's series, served by one of them.

``CTXTRACE_PROMETHEUS_SCRAPE=host`` (the default under ``ctxtrace run``). Every
process writes its series into a shared folder (``spool.py``) every
``WRITE_INTERVAL_S`` and when it flushes or ends; one process, the one holding
the folder's server lock, serves the first free port of
``CTXTRACE_PROMETHEUS_PORT`` with its own series read live and everyone else's
read from their files. The first process takes the lock (the gunicorn master,
Celery's or RQ's main process); should it die, another takes it over at its
next tick and binds the same, now free, port.

Why files and not prometheus_client's multiprocess mode: that mode aggregates
prometheus_client's own instruments (ours are OpenTelemetry's, read at
collection), has no process metrics (the alert rules need each worker's
``process_start_time_seconds``) and keeps every dead process's counters for as
long as the folder lives. Here what a worker's own ``/metrics`` would have said
is what the host's says for it, sample for sample.

Processes that end: their last file is served for ``CTXTRACE_PROMETHEUS_RETAIN``
seconds after its last write, then deleted. A retired worker's counters thus
stay flat at their final value, taken at its exit and so including what it
counted after the last scrape, and then leave the exposition. Each process has
series of its own (``worker`` is ``host:pid:role``), so the drop is never read
as a counter reset: ``sum(increase(...))`` over a host counts each worker's
final increments once, while its series is served, and never goes negative.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ctxtrace.telemetry.prometheus import (
    MAX_SCAN,
    Endpoint,
    WorkerLabelled,
    bind,
    locked_by_someone,
    open_small_file,
    registry_of,
)
from ctxtrace.telemetry.spool import SUFFIX, Spool, lock_name

if TYPE_CHECKING:
    from ctxtrace._config import Config

#: Seconds between a process's writes of its file (a scrape sees values this old at most).
WRITE_INTERVAL_S: Final = 1.0
#: Seconds before a process that failed to bind the host's port tries again.
RETRY_BIND_S: Final = 10.0
#: Largest file read: a worker serving one app writes about 12 KB.
MAX_SPOOL_FILE: Final = 4 * 1024 * 1024
#: The lock the serving process holds.
SERVER_LOCK: Final = ".server.lock"

#: ``providers.RecordError``, not imported: ``providers`` loads (lazily) the module
#: that imports this one, and the architecture allows that one cycle only.
RecordError = Callable[[str, BaseException], object]

_private_folder: Path | None = None
_private_owner = 0


def private_folder() -> Path:
    """A folder of this process tree's own, when none is configured.

    Made by the first process that needs it and inherited, as a module global, by
    the processes it forks; removed by its maker at its end (``release_private``).
    """
    global _private_folder, _private_owner
    if _private_folder is None:
        _private_folder = Path(tempfile.mkdtemp(prefix="ctxtrace-metrics-"))
        _private_owner = os.getpid()
    return _private_folder


def release_private(folder: Path) -> None:
    """The maker of the private folder ends: the folder goes (forked children keep it)."""
    global _private_folder
    if folder == _private_folder and os.getpid() == _private_owner:
        _private_folder = None
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path, lock: Path, now: float, retain_s: float) -> str | None:
    """A process's file, if it is served: its process lives, or ended ``retain_s`` ago at most.

    An expired file and its lock are deleted here.
    """
    fd = open_small_file(path, MAX_SPOOL_FILE)
    if fd is None:
        return None
    try:
        lock_fd = open_small_file(lock)
        try:
            alive = lock_fd is not None and locked_by_someone(lock_fd)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        if not alive and now - os.fstat(fd).st_mtime > retain_s:
            for gone in (path, lock):
                with contextlib.suppress(OSError):
                    gone.unlink()
            return None
        size = os.fstat(fd).st_size
        return os.pread(fd, size, 0).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def _sweep(folder: Path, names: Iterable[str], now: float, retain_s: float) -> None:
    """Leftovers of processes that died mid-write: temporary files and lone locks."""
    listed = set(names)
    for name in listed:
        leftover = SUFFIX + "." in name or (
            name.endswith(".lock") and name[1:].removesuffix(".lock") + SUFFIX not in listed
        )
        if not leftover or name == SERVER_LOCK:
            continue
        path = folder / name
        with contextlib.suppress(OSError):
            if now - os.lstat(path).st_mtime <= retain_s:
                continue
            fd = open_small_file(path, MAX_SPOOL_FILE)
            if fd is None:
                continue
            try:
                if not locked_by_someone(fd):
                    path.unlink()
            finally:
                os.close(fd)


def read_spool(folder: Path, skip: str, retain_s: float) -> list[str]:
    """The texts of the files served now (newest first), expired ones deleted on the way."""
    now = time.time()
    try:
        with os.scandir(folder) as entries:
            names = [e.name for _, e in zip(range(MAX_SCAN), entries, strict=False)]
    except OSError:
        return []
    found: list[tuple[float, str]] = []
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith(".") or name == skip:
            continue
        text = _read(folder / name, folder / lock_name(name), now, retain_s)
        if text is not None:
            with contextlib.suppress(OSError):
                found.append((os.stat(folder / name).st_mtime, text))
    _sweep(folder, names, now, retain_s)
    return [text for _, text in sorted(found, key=lambda item: -item[0])]


class HostCollector(Collector):
    """This process's families read live, merged with every served file's.

    Families are merged by name; a series (name and labels) is taken once, from
    the first source that has it: this process, then the newest file (two
    files can only share a series if a pid was reused, and a scrape with one
    series twice would be refused).
    """

    def __init__(
        self, folder: Path, own: Collector, skip: Callable[[], str], retain_s: float
    ) -> None:
        self._folder = folder
        self._own = own
        self._skip = skip
        self._retain_s = retain_s

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

        def add(family: Metric) -> None:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen.add(key)
                    merged.samples.append(sample)

        for family in self._own.collect():
            add(family)
        for text in read_spool(self._folder, self._skip(), self._retain_s):
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue  # not ours, or damaged: the rest is still served
            for family in parsed:
                add(family)
        return list(families.values())


def claim(folder: Path) -> int | None:
    """The server lock's descriptor if this process now holds it, else ``None``."""
    fd = os.open(folder / SERVER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class HostScrape:
    """This process's part in the host's address: its file, and the address while it serves."""

    def __init__(self, own: WorkerLabelled, config: Config, record: RecordError) -> None:
        self.folder = Path(config.prometheus_spool_dir) if config.prometheus_spool_dir else (
            private_folder()
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._config = config
        self._record = record
        self.own = own
        self.spool = Spool(self.folder, own, own.worker)
        self.endpoint: Endpoint | None = None
        self._server_fd: int | None = None
        self._next_write = 0.0
        self._next_bind = 0.0
        self.serve()

    def serve(self) -> None:
        """Serve the host's address if no live process does (the server lock says)."""
        if self.endpoint is not None or time.monotonic() < self._next_bind:
            return
        fd = claim(self.folder)
        if fd is None:
            return
        config = self._config
        registry = registry_of(
            HostCollector(self.folder, self.own, lambda: self.spool.name, config.prometheus_retain)
        )
        try:
            self.endpoint = bind(registry, config.prometheus_host, config.prometheus_port)
        except OSError as exc:
            # Let another process try; this one tries again later.
            os.close(fd)
            self._next_bind = time.monotonic() + RETRY_BIND_S
            self._record("exporter.metrics.prometheus", exc)
            return
        self._server_fd = fd

    def tick(self) -> None:
        """From the metrics thread: write the file when due; take over serving if needed."""
        now = time.monotonic()
        if now >= self._next_write:
            self._next_write = now + WRITE_INTERVAL_S
            self.write()
        self.serve()

    def write(self) -> None:
        self.spool.write()

    def rename(self, worker: str) -> None:
        """The process's label changed (``own`` says the new one): so does its file's name."""
        self.spool.rename(worker)

    def close(self) -> None:
        """Stop serving; the file stays (the last word of this process) unless it is the
        private folder's maker, whose folder goes with it."""
        endpoint, self.endpoint = self.endpoint, None
        fd, self._server_fd = self._server_fd, None
        try:
            if endpoint is not None:
                endpoint.close()
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.spool.close()
            release_private(self.folder)
