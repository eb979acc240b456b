"""Turning ctxtrace on and off: one agent per process, built whole or not at all.

``instrument()`` resolves the configuration, builds the ledger, the emitters
and the hooks, and only then installs the hooks and sets the flag (so a failure
leaves nothing half-initialised). ``uninstrument()`` takes it all back. Both are
idempotent and serialised by one lock; a repeated call logs one line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from ctxtrace import _green, _worker, integrations
from ctxtrace._config import Config, ConfigError, shown
from ctxtrace._events import Event, Kind, Site, Unit
from ctxtrace._host import UnitHandle
from ctxtrace.core import flaskshape
from ctxtrace.core.counters import read_count
from ctxtrace.core.guard import InternalErrors
from ctxtrace.core.hooks import Hooks
from ctxtrace.core.ledger import Ledger
from ctxtrace.core.records import LedgerPolicy, StatsSnapshot
from ctxtrace.integrations import kit
from ctxtrace.telemetry import trace_ids, wiring
from ctxtrace.telemetry.logs import LogEmitter, log_line


class Emitter(Protocol):
    """A subscriber to ledger events: logs, spans, metrics.

    Optionally also ``start()``, ``stop(timeout_s)``, ``flush(timeout_s)`` and
    ``after_fork()``, which the agent calls when it has them.
    """

    @property
    def name(self) -> str: ...

    def handle(self, event: Event) -> None: ...


class _Suppressions:
    """Known and accepted sites: a module prefix or an exact ``file:line``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._modules = tuple(p for p in patterns if ".py:" not in p)
        self._lines = frozenset(p for p in patterns if ".py:" in p)
        self._cache: dict[Site, bool] = {}

    def __call__(self, site: Site | None) -> bool:
        if site is None or not (self._modules or self._lines):
            return False
        known = self._cache.get(site)
        if known is None:
            known = self._match(site)
            if len(self._cache) < 4096:
                self._cache[site] = known
        return known

    def _match(self, site: Site) -> bool:
        if any(site.module == m or site.module.startswith(m + ".") for m in self._modules):
            return True
        location = f"{site.file}:{site.line}"
        return any(location == p or location.endswith("/" + p) for p in self._lines)


class Agent:
    """Everything one instrumentation owns; built by ``instrument()``.

    To its emitters and integrations it is a ``Host`` (``ctxtrace/_host.py``):
    they get this object but may use only what that protocol names.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.shape = flaskshape.detect()
        self.errors = InternalErrors(self._log_internal_error)
        self.worker = _worker.worker_id()
        self.logs = LogEmitter(
            lambda: self.worker, config.log_rate_window, config.log_lifecycle,
            enrich=trace_ids.enrich,
        )
        self.emitters: list[Emitter] = [self.logs]
        # Spans need push/pop events (``all``) and the trace current at each push.
        needs = wiring.ledger_needs(config)
        self.ledger = Ledger(
            self._dispatch,
            LedgerPolicy(
                cap=config.ledger_cap,
                flight=config.flight_record,
                long_lived_request_s=config.long_lived_request,
                long_lived_app_s=config.long_lived_app,
                long_lived_streaming=config.long_lived_streaming,
                detect=config.detectors,
                access_window_s=config.log_rate_window,
            ),
            slots=self.shape.slots,
            repush_stacks=not self.shape.merged,
            lifecycle=config.log_lifecycle or needs.lifecycle,
            requests=needs.requests,
            capture=needs.capture,
            describe=lambda ctx: self.hooks.describe(ctx),  # noqa: PLW0108 - hooks are built below
        )
        self.hooks = Hooks(
            self.ledger,
            self.shape,
            self.errors,
            repair=config.repair,
            suppressed=_Suppressions(config.suppress) if config.suppress else None,
            detect_access=config.detect_out_of_context_access,
        )
        # Metrics and spans (ctxtrace/telemetry/wiring.py).
        self.telemetry: list[Any] = wiring.emitters(self)
        self.emitters.extend(self.telemetry)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.integrations: list[Callable[[], None]] = []
        self.stopped = False
        # Set in a forked child that waits for gevent's patch (``after_fork``).
        self._unpatched: Callable[[], None] | None = None

    def subscribe(self, emitter: Emitter) -> None:
        """Add an emitter to a running agent (tests, the pytest plugin)."""
        self.emitters = [*self.emitters, emitter]

    def unsubscribe(self, emitter: Emitter) -> None:
        self.emitters = [e for e in self.emitters if e is not emitter]

    def begin_unit(self, kind: str, name: str, *, defer_stale: bool = False) -> UnitHandle:
        """Start a unit of work (task, job, command, thread) on the calling thread.

        Integrations call this where their unit starts and ``end_unit`` where it
        ends, on the same thread; contexts the unit leaves pushed are leaked.
        With ``defer_stale``, what earlier units left is looked for at its end,
        unless a unit inside it (a request) has looked by then.
        """
        try:
            unit = self.ledger.begin_unit(kind, name, check_stale=not defer_stale)
        except Exception as exc:
            self.errors.record("units", exc)
            return UnitHandle(None)
        return UnitHandle(unit)

    def end_unit(self, handle: UnitHandle) -> None:
        """End a unit started by ``begin_unit``; repairs leaks when ``repair`` is on."""
        if handle.unit is not None:
            self.hooks.end_unit(handle.unit)

    def escaped(self, exc: BaseException) -> None:
        self.hooks.escaped(exc)

    @property
    def running(self) -> bool:
        """Whether this agent is the one running (one stopped meanwhile stays quiet)."""
        return _agent is self

    def current_unit(self) -> Unit | None:
        unit = self.ledger.current_unit()
        return unit.info() if unit is not None else None

    def set_role(self, role: str) -> None:
        if _worker.role() != role:
            _worker.set_role(role)
            self.refresh_worker()

    def refresh_worker(self) -> None:
        """The ``worker`` label again, from what is known now; a change follows everywhere."""
        worker = _worker.worker_id()
        if worker != self.worker:
            self.worker = worker
            self.renamed()

    def snapshot(self) -> list[StatsSnapshot]:
        return self.ledger.snapshot()

    def drain_durations(self) -> Iterator[tuple[Kind, str, float]]:
        return self.ledger.drain_durations()

    def take_depth_max(self) -> int:
        return self.ledger.take_depth_max()

    def repeated_accesses(self) -> list[tuple[tuple[str, ...], int]]:
        return self.ledger.repeated_accesses()

    def dropped(self) -> dict[str, int]:
        return {"context": read_count(self.ledger.dropped_contexts), "log": self.logs.dropped}

    def renamed(self) -> None:
        """``worker`` changed (the process's role became known): emitters that publish it follow."""
        self._each(self._with_telemetry(), "renamed")

    def _dispatch(self, event: Event) -> None:
        if self.stopped:
            # Wrappers entered before ``stop()`` still finish their work, and a
            # request in flight then ends its unit in this ledger, which saw its
            # pushes but not the pops Flask's own methods did since: stale news,
            # never anomalies. A stopped agent reports nothing.
            return
        for emitter in self.emitters:
            try:
                emitter.handle(event)
            except Exception as exc:
                self.errors.record(emitter.name, exc)

    def _log_internal_error(self, component: str, exc: BaseException) -> None:
        # Not through the failing emitter's stream alone: when that is what broke
        # (a full disk, a stalled pipe) the line goes to the next place that works.
        log_line(
            "error",
            "ctxtrace.internal_error",
            component=component,
            exc_type=type(exc).__name__,
            exc_message=str(exc)[:200],
            worker=self.worker,
            note="counted in ctxtrace_internal_errors_total; later errors are not logged",
        )

    # -- running ----------------------------------------------------------

    def start(self) -> None:
        started: list[Any] = []
        try:
            for emitter in self.emitters:
                start = getattr(emitter, "start", None)
                if start is not None:
                    start()
                    started.append(emitter)
            self.hooks.install()
        except BaseException:
            for emitter in started:
                emitter.stop(1.0)
            raise
        self._start_watchdog()
        # No SIGTERM handler, ever: where SIGTERM has its default disposition the
        # process must die at once (a Python handler runs only between bytecodes,
        # so one would delay death until a long C call returns), and
        # ``signal.getsignal`` must answer what the application set. Servers that
        # handle SIGTERM (gunicorn, Celery, RQ) exit through ``sys.exit``, where
        # the atexit handler flushes; a process killed by the default SIGTERM
        # loses what the exporters still buffer (README, "Reliability and security").
        # Tasks, jobs, commands and threads as units; each one fails alone.
        self.integrations = integrations.install_all(self)
        # eventlet is not supported: off before it patches this process (``_green``).
        self.integrations.append(
            kit.on_import(
                "eventlet.patcher",
                lambda patcher: _green.wrap_eventlet_patch(patcher, _refuse_for_eventlet),
                lambda exc: self.errors.record("eventlet", exc),
            )
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        try:
            # Accesses made outside any unit are told now, while the emitters listen.
            self.ledger.settle_all()
        except Exception as exc:
            self.errors.record("ledger", exc)
        self.stopped = True
        unpatched, self._unpatched = self._unpatched, None
        if unpatched is not None:
            with contextlib.suppress(Exception):
                unpatched()
        integrations.uninstall_all(self, self.integrations)
        self.integrations = []
        self.hooks.uninstall()
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout_s)
        # One budget for all of them: each emitter bounds its own stop by what is left.
        self._each(self._with_telemetry(), "stop", deadline)

    def _with_telemetry(self) -> list[Any]:
        """The emitters, plus the telemetry ones if a caller replaced the list: they own
        threads, ports and files that must follow the agent's life."""
        return [*self.emitters, *(e for e in self.telemetry if e not in self.emitters)]

    def flush(self, timeout_s: float = 5.0) -> None:
        """Hand over what the emitters buffer, within ``timeout_s`` in all.

        For processes that end without atexit handlers (an RQ work-horse, a
        Celery pool process): integrations call it when such a unit ends.
        """
        self._each(self.emitters, "flush", time.monotonic() + timeout_s)

    def _each(self, emitters: list[Any], method: str, deadline: float | None = None) -> None:
        """``method()`` on each emitter that has it, or ``method(seconds left)`` with a
        ``deadline``; one that raises is counted and the others still run."""
        for emitter in emitters:
            call = getattr(emitter, method, None)
            if call is not None:
                try:
                    if deadline is None:
                        call()
                    else:
                        call(max(0.0, deadline - time.monotonic()))
                except Exception as exc:
                    self.errors.record(emitter.name, exc)

    def _start_watchdog(self) -> None:
        self._stop = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="ctxtrace-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.config.sweep_interval):
            self.sweep()

    def sweep(self) -> None:
        """One round of the periodic checks (also called directly by tests)."""
        try:
            self.ledger.sweep()
        except Exception as exc:
            self.errors.record("watchdog", exc)
        try:
            self.logs.tick()
        except Exception as exc:
            self.errors.record("logs", exc)

    def at_exit(self, timeout_s: float = 2.0) -> None:
        """The process ends: what is still pushed is leaked; flush within ``timeout_s``."""
        try:
            self.ledger.finish_all()
        except Exception as exc:
            self.errors.record("ledger", exc)
        self.stop(timeout_s)

    def after_fork(self) -> None:
        """In a forked child: new identity, no inherited contexts, fresh threads.

        Where gevent will patch this child later (its gunicorn worker), the
        per-thread state and the threads wait for the patch (``_green``), or for
        the first context the child pushes if gevent never patches it.
        """
        self.worker = _worker.worker_id()
        self.ledger.forget_all()
        if not _green.patch_pending():
            self._restart_in_child()
            return
        restart = _Once(self._restart_in_child)
        self.ledger.first_use = restart
        try:
            self._unpatched = _green.when_patched(restart)
        except Exception as exc:
            self.errors.record("gevent", exc)
            restart()

    def _restart_in_child(self) -> None:
        """The rest of ``after_fork``: per-thread state, the emitters' and our threads."""
        self.ledger.first_use = None
        unpatched, self._unpatched = self._unpatched, None
        if unpatched is not None:
            with contextlib.suppress(Exception):
                unpatched()
        if self.stopped:
            return
        try:
            self.ledger.rebind_threads()
        except Exception as exc:
            self.errors.record("ledger", exc)
        self._each(self._with_telemetry(), "after_fork")
        self._start_watchdog()


class _Once:
    """Calls ``function`` the first time it is called, from whichever thread; never raises."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._function: Callable[[], None] | None = function
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            function, self._function = self._function, None
        if function is not None:
            with contextlib.suppress(Exception):
                function()


_lock = threading.RLock()
_agent: Agent | None = None


def current() -> Agent | None:
    """The running agent, if any."""
    return _agent


def start(
    arguments: Mapping[str, object], app_config: Mapping[str, object] | None = None
) -> Agent | None:
    """Build and start the agent unless one runs; see ``ctxtrace.instrument``."""
    global _agent
    with _lock:
        if _agent is not None:
            log_line(
                "info", "ctxtrace.already_instrumented", note="repeated instrument() call ignored"
            )
            return None
        try:
            config = Config.resolve(arguments, app_config, os.environ)
            if config.enabled:
                _check_at_start(config)
        except ConfigError as exc:
            if exc.source != "environment":
                raise
            _log_config_error(exc)
            return None
        if not config.enabled:
            return None
        if _green.eventlet_patched():
            log_line(
                "error", "ctxtrace.unsupported", library="eventlet",
                note="eventlet has monkey-patched this process, which ctxtrace does not "
                "support: ctxtrace stays off; the application runs",
            )
            return None
        agent = Agent(config)
        agent.start()
        _agent = agent
        return agent


#: Environment errors logged already: the environment is the same at every
#: ``instrument()`` call of a process, and one line says it.
_config_errors_logged: set[tuple[str, str]] = set()


def _log_config_error(exc: ConfigError) -> None:
    seen = (exc.key, shown(exc.value))
    if seen in _config_errors_logged or len(_config_errors_logged) >= 64:
        return
    _config_errors_logged.add(seen)
    log_line(
        "error", "ctxtrace.config_error", key=exc.key, value=shown(exc.value),
        allowed=exc.allowed, source=exc.source,
        note="ctxtrace stays off; the application runs",
    )


def _check_at_start(config: Config) -> None:
    """Values that parse but cannot work here: found now, named, not at first use.

    Raises ``ConfigError`` with the source of the value (an environment error
    switches ctxtrace off with one line, like a value that does not parse).
    """
    if config.metrics == "prometheus":
        host = config.prometheus_host
        try:
            # The endpoint's own lookup, done first: a name that does not resolve
            # would otherwise fail later as an internal error naming no variable.
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (OSError, UnicodeError) as exc:
            raise ConfigError(
                "CTXTRACE_PROMETHEUS_HOST", host, "an address or host name this machine resolves",
                config.sources.get("prometheus_host", "argument"),
            ) from exc
    if config.metrics != "prometheus":
        return
    for name, event in (
        ("prometheus_targets_dir", "ctxtrace.targets_dir_unsafe"),
        ("prometheus_spool_dir", "ctxtrace.spool_dir_unsafe"),
    ):
        folder = getattr(config, name)
        if folder:
            _check_folder(folder, name, event, config.sources.get(name, "argument"))


def _check_folder(folder: str, name: str, event: str, source: str) -> None:
    """A folder option's folder made if missing; unusable: an error, writable by all: a warning."""
    # Imported here: the Prometheus exporter is only needed when it is used.
    from ctxtrace.telemetry.prometheus import UnsafeFolder, check_folder  # noqa: PLC0415

    key = "CTXTRACE_" + name.upper()
    try:
        check_folder(folder)
    except UnsafeFolder as warning:
        log_line("warning", event, key=key, value=shown(folder), reason=str(warning))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            key, folder, f"a directory ctxtrace can create and write ({reason})", source
        ) from exc


def stop() -> bool:
    """Stop the running agent; ``False`` (and one log line) when none runs."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is None:
        log_line("info", "ctxtrace.not_instrumented", note="repeated uninstrument() call ignored")
        return False
    agent.stop()
    return True


def _refuse_for_eventlet() -> None:
    """eventlet is about to patch this process: the running agent, if any, stops now,
    while its threads are threads that can end cleanly."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is None:
        return
    agent.stop(1.0)
    log_line(
        "error", "ctxtrace.unsupported", library="eventlet", worker=agent.worker,
        note="eventlet is about to monkey-patch this process, which ctxtrace does "
        "not support: ctxtrace turned itself off; the application runs",
    )


def _after_fork_in_child() -> None:
    global _lock
    # The lock may have been held by another thread at fork time.
    _lock = threading.RLock()
    # Before the agent recomputes its identity: a gunicorn master's child is a worker.
    _worker.forked()
    if _agent is not None:
        _agent.after_fork()


def _at_exit() -> None:
    agent = _agent
    if agent is not None:
        agent.at_exit()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
