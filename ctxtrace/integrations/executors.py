"""``concurrent.futures.ThreadPoolExecutor`` work items as units of work.

A pool thread outlives the work it runs: one thread serves task after task (and,
in gunicorn's gthread worker, request after request). As a thread unit alone, a
context a task pushed and never popped would stay on the thread unreported, and
the next task would inherit it (and, on Flask <= 3.1, its ``g``) silently. So
each work item is a unit of its own, named after its function: what it leaves
pushed is leaked when it returns, and the next unit on that thread finds it
stale. An out-of-context access in a task names the unit that submitted it as
``started_by``, not the one that happened to start the pool thread.

``ThreadPoolExecutor.submit`` is the one patch (``map`` goes through it): it
runs in the submitting thread, where the submitting unit is known, and hands
the pool a callable that runs the function inside the unit.

A work item that serves requests itself (gthread's ``handle``) must not report
a stale context under its own name before the request does under the
endpoint's: its unit checks for stale contexts at its end, unless a unit inside
it (the request) has checked already.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from ctxtrace.core import units
from ctxtrace.core.names import safe_name
from ctxtrace.core.patching import put_wrapper
from ctxtrace.integrations.kit import on_import

if TYPE_CHECKING:
    from ctxtrace._events import Unit
    from ctxtrace._host import Host

#: The unit kind of an executor work item.
KIND: Final = "executor"


def install(host: Host) -> Callable[[], None]:
    # Hooked when the application (or gunicorn's gthread worker) imports the
    # module: ctxtrace does not import it itself.
    return on_import(
        "concurrent.futures.thread",
        lambda module: _patch(host, module),
        lambda exc: host.errors.record("integration.executors", exc),
    )


def _patch(host: Host, module: ModuleType) -> Callable[[], None]:
    cls = module.ThreadPoolExecutor
    original = vars(cls)["submit"]

    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if host.running:
            try:
                fn = _WorkItemUnit(host, fn, host.current_unit())
            except Exception as exc:
                host.errors.record("executors", exc)
        return original(self, fn, *args, **kwargs)

    return put_wrapper(cls, "submit", submit, original)


#: Unit names by code object, bounded: gthread submits a new bound method per
#: request, and spelling a name out costs more than the unit itself. Keyed by code,
#: never by the callable, so no closure (and what it holds) is kept alive here.
_NAMES: dict[object, str] = {}
_MAX_NAMES: Final = 1024


def unit_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of the function a work item runs, through partials and wrappers."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        # Looked up on a bound method's function: through the method it is a failed
        # lookup that raises inside getattr, the costliest step here.
        wrapped = getattr(getattr(fn, "__func__", fn), "__wrapped__", None)
        if wrapped is None or not callable(wrapped):
            break
        fn = wrapped
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is not None:
        name = _NAMES.get(code)
        if name is not None:
            return name
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    name = safe_name(f"{module}.{qualname}" if module else str(qualname))
    if code is not None and len(_NAMES) < _MAX_NAMES:
        _NAMES[code] = name
    return name


class _WorkItemUnit:
    """The submitted function, run inside a unit named after it."""

    __slots__ = ("fn", "host", "parent")

    def __init__(self, host: Host, fn: Callable[..., Any], parent: Unit | None) -> None:
        self.host = host
        self.fn = fn
        self.parent = parent

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        host = self.host
        fn = self.fn
        if not host.running:
            return fn(*args, **kwargs)
        # Whoever started the pool thread, this task was handed over by the
        # submitting unit; the thread's own starter is back when it returns.
        before = units.started_by.get()
        try:
            handle = host.begin_unit(KIND, unit_name(fn), defer_stale=True)
        except Exception as exc:
            host.errors.record("executors", exc)
            return fn(*args, **kwargs)
        units.started_by.enter(self.parent)
        try:
            return fn(*args, **kwargs)
        finally:
            try:
                units.started_by.enter(before)
                if host.running:
                    host.end_unit(handle)
            except Exception as exc:
                host.errors.record("executors", exc)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn
