"""The structlog emitter: anomaly events as log lines, rate-limited per site.

ctxtrace never reconfigures structlog. If the host configured it, lines go
through the host's processors; otherwise through a private JSON-lines logger on
stderr. Each line is built only from event fields (code locations, names,
counts), so no request data can reach it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, TextIO

import structlog

from ctxtrace._events import (
    ANOMALY_KINDS,
    Anomaly,
    ContextInfo,
    ContextPopped,
    ContextPushed,
    Event,
    OutOfContextAccess,
)
from ctxtrace.core.counters import read_count

LOGGER_NAME: Final = "ctxtrace"
_ERROR_ANOMALIES: Final = frozenset(k.name for k in ANOMALY_KINDS if k.level == "error")
_MAX_KEYS: Final = 10_000


class _Descriptor:
    """Our own way to a pipe or socket: ``send`` writes without waiting."""

    def __init__(self, fd: int, mode: int) -> None:
        self.send: Callable[[bytes], int] | None = None
        self.close: Callable[[], None] = lambda: None
        if stat.S_ISFIFO(mode):
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.send = functools.partial(os.write, own)
            self.close = functools.partial(os.close, own)
        elif stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=os.dup(fd))
            self.send = lambda data: sock.send(data, socket.MSG_DONTWAIT)
            self.close = sock.close


def _close_current(own: list[_Descriptor]) -> None:
    own[0].close()


class LineWriter:
    """One write per line, and never a wait for the reader of a pipe or socket.

    stderr is often a pipe (a container runtime, a supervisor) or a socket
    (journald): if its reader stops reading, a plain write waits, on the request
    thread that reported the anomaly. For a pipe the lines go through a
    description of that pipe of our own, opened non-blocking through
    ``/proc/self/fd`` (the application's descriptor keeps its flags); for a
    socket, through ``MSG_DONTWAIT``. Whether the stream's descriptor still leads
    there is checked at every line (servers redirect stderr with ``dup2``). A
    line the reader has no room for is lost and raises ``BlockingIOError``: its
    caller counts it like any failed write (``ENOSPC`` on a full disk). A line
    longer than the pipe's atomic size (4 KiB) may be cut short then; the cut
    one is ended with a newline so the next line starts clean. Anything else (a
    file, a terminal, a stream without a descriptor) is written to as usual.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._lock = threading.Lock()
        self._target: tuple[int, int] | None = None
        # A list, so that the finaliser closes whichever descriptor is current then.
        self._own = [_Descriptor(-1, 0)]
        # Not at exit: ctxtrace's own atexit handler writes its last lines after
        # weakref's (registered later, so run earlier) would have closed it. The
        # process's end closes it then.
        weakref.finalize(self, _close_current, self._own).atexit = False

    def _send(self) -> Callable[[bytes], int] | None:
        """How to reach what the stream's descriptor leads to now (``None``: the stream)."""
        try:
            fd = self.stream.fileno()
            status = os.fstat(fd)
        except (OSError, ValueError, AttributeError):
            return None  # no descriptor (a test's capture): written as before
        target = (status.st_dev, status.st_ino)
        if target != self._target:
            self._own[0].close()
            self._target, self._own[0] = target, _Descriptor(-1, 0)
            with contextlib.suppress(OSError):
                self._own[0] = _Descriptor(fd, status.st_mode)
        return self._own[0].send

    def msg(self, message: str) -> None:
        with self._lock:
            send = self._send()
            if send is None:
                self.stream.write(message + "\n")
                self.stream.flush()
                return
            data = (message + "\n").encode(self._encoding, "backslashreplace")
            try:
                sent = send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                if sent:
                    with contextlib.suppress(OSError):
                        send(b"\n")
                raise BlockingIOError(
                    errno.EAGAIN, "log stream full (its reader is not reading): line dropped"
                )

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


# Writers by stream, so that each line does not open the pipe again.
_writers: dict[int, LineWriter] = {}


def _line_logger(stream: TextIO) -> LineWriter:
    writer = _writers.get(id(stream))
    if writer is None or writer.stream is not stream:
        if len(_writers) >= 16:
            _writers.clear()
        writer = _writers[id(stream)] = LineWriter(stream)
    return writer


def private_logger(level: int = logging.INFO, stream: TextIO | None = None) -> Any:
    """JSON lines on stderr (or ``stream``), for hosts that did not configure structlog."""
    return structlog.wrap_logger(
        # One write per line (PrintLogger writes the newline separately): workers that
        # share a stderr file or pipe would otherwise splice their lines together.
        _line_logger(stream if stream is not None else sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_name=LOGGER_NAME,
    )


def get_logger(level: int = logging.INFO) -> Any:
    """The host's structlog if configured, else the private JSON logger."""
    if structlog.is_configured():
        return structlog.get_logger(LOGGER_NAME)
    return private_logger(level)


def log_line(level: str, event: str, **fields: Any) -> bool:
    """Log one of ctxtrace's own lines wherever it can go; never raises.

    The host's structlog (if configured), else stderr; if that write fails (a
    full disk, a reader that stopped reading), the next of: stderr, then the
    process's original stderr. ``False`` when every one failed.
    """
    loggers: list[Callable[[], Any]] = [get_logger]
    if structlog.is_configured():
        loggers.append(private_logger)
    original = sys.__stderr__
    if original is not None and original is not sys.stderr:
        loggers.append(lambda: private_logger(stream=original))
    for make in loggers:
        try:
            getattr(make(), level)(event, **fields)
            return True
        except Exception:
            continue
    return False


def _context_fields(info: ContextInfo, prefix: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = {
        f"{prefix}context_id": info.id,
        f"{prefix}kind": info.kind,
        f"{prefix}site": str(info.site) if info.site is not None else None,
    }
    if info.site is not None and info.site.via is not None:
        fields[f"{prefix}library_site"] = str(info.site.via)
    if not prefix:
        fields.update(
            app=info.app,
            function=info.site.function if info.site is not None else None,
            thread=info.thread_name,
            depth=info.depth,
            push_count=info.push_count,
            pushed_in=f"{info.unit.kind}:{info.unit.name}" if info.unit is not None else None,
        )
    return fields


#: What a rate limiter held back under one key: ``(key, count, the last event held back)``.
Held = tuple[tuple[str, str], int, object]


class RateLimiter:
    """First occurrence of a key always passes; then one summary per window.

    What a window held back is counted per key, with the last event held back,
    so that it can be written out when the window has passed (``drain_due``) or
    the process ends (``drain``): a window nothing followed would otherwise be
    lost, and logs would undercount.
    """

    def __init__(self, window_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_s
        self._clock = clock
        #: key -> [window start, held back since the last line, the last event held back]
        self._seen: dict[tuple[str, str], list[Any]] = {}
        #: Held back under keys forgotten to stay bounded, not yet written out.
        self._held: list[Held] = []
        self._lock = threading.Lock()
        self.dropped = itertools.count()

    def admit(self, key: tuple[str, str], event: object = None) -> int | None:
        """``None`` to drop the line, else how many were dropped since the last one."""
        if self.window is None:
            return 0
        now = self._clock()
        with self._lock:
            state = self._seen.get(key)
            if state is None:
                if len(self._seen) >= _MAX_KEYS:
                    # Bounded: what the forgotten keys held back is still written out.
                    self._held = [*self._held, *self._take()][-_MAX_KEYS:]
                    self._seen.clear()
                self._seen[key] = [now, 0, None]
                return 0
            if now - state[0] < self.window:
                state[1] += 1
                state[2] = event
                next(self.dropped)
                return None
            suppressed = int(state[1])
            state[0], state[1], state[2] = now, 0, None
            return suppressed

    def _take(self) -> list[Held]:
        taken: list[Held] = []
        for key, state in self._seen.items():
            if state[1]:
                taken.append((key, int(state[1]), state[2]))
                state[1], state[2] = 0, None
        return taken

    def drain(self) -> list[Held]:
        """What every key held back since its last line: ``(key, count, last event)``;
        counted as written from now on."""
        with self._lock:
            taken = [*self._held, *self._take()]
            self._held.clear()
        return taken

    def drain_due(self) -> list[Held]:
        """Like ``drain``, for the keys whose window has passed with nothing after it:
        their summary is due now, not at the next occurrence (which may never come).
        A new window starts for each of them."""
        if self.window is None:
            return []
        now = self._clock()
        taken: list[Held] = []
        with self._lock:
            for key, state in self._seen.items():
                if state[1] and now - state[0] >= self.window:
                    taken.append((key, int(state[1]), state[2]))
                    state[0], state[1], state[2] = now, 0, None
        return taken


class LogEmitter:
    """Turns events into structlog lines."""

    name: Final = "logs"

    def __init__(
        self,
        worker: Callable[[], str],
        rate_window_s: float | None,
        lifecycle: bool,
        enrich: Callable[[Event], dict[str, str]] = lambda event: {},
    ) -> None:
        self._worker = worker
        self._limiter = RateLimiter(rate_window_s)
        self._lifecycle = lifecycle
        self._enrich = enrich
        self._private = private_logger(logging.DEBUG if lifecycle else logging.INFO)

    @property
    def dropped(self) -> int:
        return read_count(self._limiter.dropped)

    def _logger(self) -> Any:
        return structlog.get_logger(LOGGER_NAME) if structlog.is_configured() else self._private

    def handle(self, event: Event) -> None:
        if isinstance(event, Anomaly):
            self._anomaly(event)
        elif isinstance(event, OutOfContextAccess):
            self._access(event, summary=event.counted_since_last if event.summary else 0)
        elif self._lifecycle and isinstance(event, ContextPushed | ContextPopped):
            self._lifecycle_line(event)

    def _common(self, event: Event) -> dict[str, Any]:
        fields: dict[str, Any] = {"pid": os.getpid(), "worker": self._worker()}
        fields.update(self._enrich(event))
        return fields

    # -- what the rate limit held back ---------------------------------------------

    def flush(self, timeout_s: float = 0.0) -> None:
        """Write out what the rate limit held back: one summary line per site.

        Called when the process ends (``stop``, from atexit or uninstrument) and
        where it ends without atexit (an RQ work-horse, a Celery pool process), so
        that no window's occurrences are lost. A summary line is the last line held
        back, with ``suppressed_since_last`` (how many occurrences it stands for)
        and ``summary: true`` (it is not an occurrence of its own).
        """
        self._summaries(self._limiter.drain())

    def tick(self) -> None:
        """Write the summaries that are due (the watchdog calls this): a window that
        passed with no occurrence after it is summed up within a sweep, not at exit."""
        self._summaries(self._limiter.drain_due())

    def _summaries(self, held: list[Held]) -> None:
        for _key, count, event in held:
            if isinstance(event, Anomaly):
                self._anomaly(event, summary=count)
            elif isinstance(event, OutOfContextAccess):
                self._access(event, summary=count)

    def stop(self, timeout_s: float = 0.0) -> None:
        self.flush(timeout_s)

    def after_fork(self) -> None:
        """A forked child counts its own occurrences: none of the parent's, held back or not."""
        self._limiter = RateLimiter(self._limiter.window)

    # -- lines -------------------------------------------------------------------------

    def _anomaly(self, event: Anomaly, summary: int = 0) -> None:
        if summary:
            suppressed: int | None = summary
        else:
            site = str(event.context.site) if event.context.site is not None else "?"
            suppressed = self._limiter.admit((event.name, site), event)
            if suppressed is None:
                return
        fields = self._common(event)
        fields.update(_context_fields(event.context))
        fields.update(
            anomaly=event.name,
            age_s=round(max(0, event.at_ns - event.context.pushed_ns) / 1e9, 6)
            if event.context.pushed_ns
            else None,
            seen_on_thread=event.thread_name,
            flight=[
                f"{r.op} {r.kind}#{r.context_id} at {r.site or '?'} on {r.thread_name}"
                for r in event.flight
            ],
        )
        if event.other is not None:
            fields.update(_context_fields(event.other, prefix="top_"))
        if event.unit is not None:
            fields["unit"] = f"{event.unit.kind}:{event.unit.name}"
        if event.reason:
            fields["reason"] = event.reason
        if event.repaired:
            fields["repaired"] = True
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        if summary:
            fields["summary"] = True
        log = self._logger()
        method = log.error if event.name in _ERROR_ANOMALIES else log.warning
        method(f"ctxtrace.{event.name}", **fields)

    def _access(self, event: OutOfContextAccess, summary: int = 0) -> None:
        site = str(event.site) if event.site is not None else "?"
        if summary:
            suppressed: int | None = summary
        else:
            # Per outcome: an escaped access (a warning) is never held back under a
            # handled one's line (info), and each summary's count is of one outcome.
            key = (f"out_of_context_access:{event.outcome}", site)
            suppressed = self._limiter.admit(key, event)
            if suppressed is None:
                return
        fields = self._common(event)
        fields.update(
            proxy=event.proxy,
            phase=event.phase,
            outcome=event.outcome,
            site=site,
            function=event.site.function if event.site is not None else None,
            thread=event.thread_name,
            exc_type=event.exc_type,
            exc_message=event.exc_message,
            unit=f"{event.unit.kind}:{event.unit.name}" if event.unit is not None else None,
        )
        if event.parent_unit is not None:
            fields["started_by"] = f"{event.parent_unit.kind}:{event.parent_unit.name}"
        if event.site is not None and event.site.via is not None:
            fields["library_site"] = str(event.site.via)
        # Held back here, plus the repeats the ledger only counted (``core.accesses``).
        if not summary:
            suppressed = (suppressed or 0) + event.counted_since_last
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        if summary:
            fields["summary"] = True
        # One the application caught is worth seeing, not worth a warning.
        log = self._logger()
        method = log.warning if event.outcome == "escaped" else log.info
        method("ctxtrace.out_of_context_access", **fields)

    def _lifecycle_line(self, event: ContextPushed | ContextPopped) -> None:
        fields = self._common(event)
        fields.update(_context_fields(event.context))
        if isinstance(event, ContextPopped):
            fields["duration_s"] = round(event.duration_s, 6)
            self._logger().debug("ctxtrace.pop", **fields)
        else:
            self._logger().debug("ctxtrace.push", **fields)
