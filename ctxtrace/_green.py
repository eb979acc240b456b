"""gevent's monkey-patching when it comes after ctxtrace started in the process.

gunicorn's gevent worker patches in the worker: after the fork, after
``--preload`` imported the application and after the at-fork hooks, where the
agent re-initialises itself. Per-thread state made before the patch is a native
``threading.local``, which every greenlet of the worker shares (each request
would see the others' thread), and a thread started before it is a real thread
that the patched ``threading`` no longer knows (it dies with a ``KeyError`` in
``threading._delete`` at exit). So in a forked child where gevent is imported
and has not patched ``threading`` yet, the agent makes both only once gevent has
patched, through gevent's own notification (``gevent.events``).

gevent is never imported here: only looked at when the application imported it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


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
