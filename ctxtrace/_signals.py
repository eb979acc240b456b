"""Flushing telemetry when the process is told to stop.

A process killed by an unhandled SIGTERM runs no atexit handler, so whatever
the exporters buffer would be lost. When nobody else handles SIGTERM (the
default disposition: ``python script.py``, ``flask run``), ctxtrace installs a
handler that flushes within a bounded time, then restores the default and
re-raises the signal, so the process ends exactly as it would have. Servers
that handle SIGTERM themselves (gunicorn, Celery, RQ) exit through
``sys.exit``, where the atexit handler flushes; theirs is never replaced.

uWSGI forks its workers from C: ``os.register_at_fork`` hooks (and so ctxtrace's
per-worker identity, endpoint and threads) run there only with
``--py-call-uwsgi-fork-hooks``; its workers stop with SIGINT/SIGQUIT through
Python's normal exit, where the atexit handler flushes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

#: Longest a SIGTERM waits for the flush before the process goes.
FLUSH_BUDGET_S: Final = 3.0

_installed: Any = None


def install(flush: Callable[[float], None]) -> bool:
    """Handle SIGTERM by flushing first, unless the host handles it (main thread only)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
    except (ValueError, OSError):
        return False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # The flush runs on its own thread so that a lock held by the code this
        # signal interrupted cannot hold the process forever.
        worker = threading.Thread(
            target=flush, args=(FLUSH_BUDGET_S,), name="ctxtrace-sigterm", daemon=True
        )
        worker.start()
        worker.join(FLUSH_BUDGET_S + 0.5)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    _installed = on_sigterm
    return True


def uninstall() -> None:
    """Put the default back if ours is still the handler."""
    global _installed
    handler, _installed = _installed, None
    if handler is None or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
