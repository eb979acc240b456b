"""RQ jobs as units of work.

The unit wraps ``perform_job``: the job itself and RQ's handling of its result
(success and failure callbacks included), in whichever process performs it.
RQ's default worker forks a work-horse per job and the horse leaves with
``os._exit``: no atexit handler runs, and whatever an emitter still buffers is
lost. So in a horse the host's emitters are flushed when the unit ends, before
RQ lets the horse exit.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ctxtrace.core.patching import put_wrapper
from ctxtrace.integrations.kit import FLUSH_TIMEOUT_S, on_import, tell_escaped

if TYPE_CHECKING:
    from ctxtrace._host import Host


def install(host: Host) -> Callable[[], None]:
    return on_import(
        "rq",
        lambda rq: _patch(host, rq),
        lambda exc: host.errors.record("integration.rq", exc),
    )


def _worker_class(rq: ModuleType) -> type[Any]:
    """The class that defines ``perform_job`` (``BaseWorker`` in RQ 2+, ``Worker`` before)."""
    worker: type[Any] = rq.Worker
    for cls in worker.__mro__:
        if "perform_job" in vars(cls):
            return cls
    raise LookupError("rq.Worker has no perform_job")


def _patch(host: Host, rq: ModuleType) -> Callable[[], None]:
    cls = _worker_class(rq)
    original = vars(cls)["perform_job"]

    def perform_job(self: Any, job: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
        if not host.running:
            return original(self, job, queue, *args, **kwargs)
        try:
            host.set_role("rq")
            handle = host.begin_unit("job", _job_name(job))
        except Exception as exc:
            host.errors.record("rq", exc)
            return original(self, job, queue, *args, **kwargs)
        try:
            return original(self, job, queue, *args, **kwargs)
        finally:
            try:
                if host.running:
                    host.end_unit(handle)
                    if getattr(self, "_is_horse", False):
                        host.flush(FLUSH_TIMEOUT_S)
            except Exception as exc:
                host.errors.record("rq", exc)

    remove_unit = put_wrapper(cls, "perform_job", perform_job, original)
    try:
        remove_failure = _watch_failures(host, rq)
    except BaseException:
        remove_unit()
        raise

    def remove() -> None:
        remove_failure()
        remove_unit()

    return remove


def _watch_failures(host: Host, rq: ModuleType) -> Callable[[], None]:
    """``Job.perform`` raising is the job failing: RQ catches it inside ``perform_job``."""
    job_class: type[Any] = rq.job.Job
    original = vars(job_class)["perform"]

    def perform(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except BaseException as exc:
            tell_escaped(host, exc, "rq")
            raise

    return put_wrapper(job_class, "perform", perform, original)


def _job_name(job: Any) -> str:
    """The job's function (``module.function``), which names the code to look at."""
    try:
        name = job.func_name
    except Exception:
        name = None
    return str(name or getattr(job, "id", None) or "?")
