"""Green threads: gevent's monkey-patching after ctxtrace started, and eventlet's.

gunicorn's gevent worker patches in the worker: after the fork, after
``--preload`` imported the application and after the at-fork hooks, where the
agent re-initialises itself. Per-thread state made before the patch is a native
``threading.local``, which every greenlet of the worker shares (each request
would see the others' thread), and a thread started before it is a real thread
that the patched ``threading`` no longer knows (it dies with a ``KeyError`` in
``threading._delete`` at exit). So in a forked child where gevent is imported
and has not patched ``threading`` yet, the agent makes both only once gevent has
patched, through gevent's own notification (``gevent.events``).

eventlet is not supported: its patching can come after ctxtrace started too
(``ctxtrace run``, a master that forks), and eventlet announces nothing. So
ctxtrace does not start in a process eventlet has patched, and turns itself off
just before eventlet patches one it runs in (``wrap_eventlet_patch``), while its
threads are still threads that can end cleanly.

Neither library is ever imported here: only looked at when the application imported it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ctxtrace.core.patching import put_wrapper


def patch_pending() -> bool:
    """Whether gevent is imported in this process and has not patched ``threading`` yet."""
    if "gevent" not in sys.modules:
        return False
    try:
        # gevent ships no type information: looked up as a plain module.
        monkey: Any = importlib.import_module("gevent.monkey")
        return not monkey.is_module_patched("threading")
    except Exception:
        return False


def when_patched(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once gevent has patched ``threading``; returns the remover.

    After ``patch_all`` as a whole (its later steps must not wait for threads we
    start), or after ``patch_thread`` called on its own. The callback must not
    raise: gevent passes a subscriber's error on to whoever patches.
    """
    events: Any = importlib.import_module("gevent.events")

    patching_all = False

    def subscriber(event: Any) -> None:
        nonlocal patching_all
        if isinstance(event, events.GeventWillPatchAllEvent):
            patching_all = True
        elif isinstance(event, events.GeventDidPatchAllEvent) or (
            not patching_all
            and isinstance(event, events.GeventDidPatchModuleEvent)
            and event.module_name == "threading"
        ):
            remove()
            callback()

    def remove() -> None:
        if subscriber in events.subscribers:
            events.subscribers.remove(subscriber)

    events.subscribers.append(subscriber)
    return remove


def eventlet_patched() -> bool:
    """Whether eventlet has patched ``thread`` in this process."""
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return False
    try:
        return bool(patcher.is_monkey_patched("thread"))
    except Exception:
        return False


def wrap_eventlet_patch(patcher: ModuleType, before: Callable[[], None]) -> Callable[[], None]:
    """Call ``before()`` when eventlet's ``monkey_patch`` is about to patch ``thread``.

    ``eventlet.monkey_patch`` is the same function, bound when ``eventlet`` is
    imported, after ``eventlet.patcher``: it binds the wrapper put here, or, if
    ``eventlet`` was imported already, is wrapped here too. ``before`` must look
    up the running agent itself: a wrapper bound by ``eventlet`` stays. Returns
    the remover.
    """
    original: Callable[..., Any] = patcher.monkey_patch

    def monkey_patch(**on: Any) -> Any:
        # eventlet patches ``thread`` unless told not to, or told to patch only others.
        explicit = {name: value for name, value in on.items() if name != "all"}
        if on.get("thread", on.get("all", not any(explicit.values()))):
            with contextlib.suppress(Exception):  # the application's patching goes on
                before()
        return original(**on)

    removers = [put_wrapper(patcher, "monkey_patch", monkey_patch, original)]
    package = sys.modules.get("eventlet")
    if package is not None and getattr(package, "monkey_patch", None) is original:
        removers.append(put_wrapper(package, "monkey_patch", monkey_patch, original))

    def remove() -> None:
        for undo in removers:
            undo()

    return remove
