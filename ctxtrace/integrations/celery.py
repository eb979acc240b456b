"""Celery tasks as units of work, hooked through Celery's own signals.

``task_prerun`` and ``task_postrun`` are sent by Celery's tracer on the thread
that runs the task, around the task's ``__call__``: a Task base class whose
``__call__`` runs the task inside ``app.app_context()`` pushes and pops within
the unit and stays silent, a task that reads ``current_app`` without one is
reported with the task's name, and a context a task leaves pushed is leaked at
its end (and, on the pool process's next task, stale).

Pool processes end with ``os._exit`` (no atexit handlers): the host's
emitters are flushed on ``worker_process_shutdown`` and ``worker_shutdown``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from ctxtrace.integrations.kit import FLUSH_TIMEOUT_S, on_import, tell_escaped

if TYPE_CHECKING:
    from ctxtrace._host import Host, UnitHandle

#: Tasks between prerun and postrun in this process; more means postrun was
#: lost (a crashed pool process), and the oldest are forgotten.
_MAX_RUNNING: Final = 4096


def install(host: Host) -> Callable[[], None]:
    return on_import(
        "celery.signals",
        lambda signals: _Receivers(host, signals).connect(),
        lambda exc: host.errors.record("integration.celery", exc),
    )


class _Receivers:
    def __init__(self, host: Host, signals: ModuleType) -> None:
        self.host = host
        self.signals = signals
        self.running: OrderedDict[tuple[int, str], UnitHandle] = OrderedDict()
        self.lock = threading.Lock()

    def connect(self) -> Callable[[], None]:
        s = self.signals
        pairs: list[tuple[Any, Callable[..., None]]] = [
            (s.task_prerun, self.prerun),
            (s.task_failure, self.failure),
            (s.task_postrun, self.postrun),
            (s.worker_init, self.worker),
            (s.worker_process_init, self.worker),
            (s.worker_process_shutdown, self.flush),
            (s.worker_shutdown, self.flush),
        ]
        done: list[tuple[Any, Callable[..., None]]] = []
        try:
            for signal, receiver in pairs:
                signal.connect(receiver, weak=False)
                done.append((signal, receiver))
        except BaseException:
            self.disconnect(done)
            raise
        return lambda: self.disconnect(done)

    @staticmethod
    def disconnect(pairs: list[tuple[Any, Callable[..., None]]]) -> None:
        for signal, receiver in pairs:
            signal.disconnect(receiver)

    # Receivers run inside Celery's tracer: each one swallows its own errors.

    def prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        host = self.host
        if not host.running:
            return
        try:
            request = getattr(task, "request", None)
            if not getattr(request, "is_eager", False):
                host.set_role("celery")
            name = str(getattr(task, "name", None) or "?")
            handle = host.begin_unit("task", name)
            with self.lock:
                self.running[(threading.get_ident(), str(task_id))] = handle
                while len(self.running) > _MAX_RUNNING:
                    self.running.popitem(last=False)
        except Exception as exc:
            host.errors.record("celery", exc)

    def failure(self, exception: BaseException | None = None, **_: Any) -> None:
        """Sent in the task's process and thread before ``task_postrun``."""
        if exception is not None:
            tell_escaped(self.host, exception, "celery")

    def postrun(self, task_id: str | None = None, **_: Any) -> None:
        host = self.host
        try:
            with self.lock:
                handle = self.running.pop((threading.get_ident(), str(task_id)), None)
            if handle is not None and host.running:
                host.end_unit(handle)
        except Exception as exc:
            host.errors.record("celery", exc)

    def worker(self, **_: Any) -> None:
        try:
            self.host.set_role("celery")
        except Exception as exc:
            self.host.errors.record("celery", exc)

    def flush(self, **_: Any) -> None:
        try:
            self.host.flush(FLUSH_TIMEOUT_S)
        except Exception as exc:
            self.host.errors.record("celery", exc)
