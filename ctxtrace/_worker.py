"""Who this process is, for the ``worker`` label and ``service.instance.id``.

The identity is readable (host, pid, role) and unique per process; it is
recomputed after fork, because gunicorn ``--preload`` workers start as copies
of the master.
"""

from __future__ import annotations

import os
import socket
import sys

_role: str | None = None


def set_role(role: str) -> None:
    """Integrations say what this process is (a Celery worker, a CLI command...)."""
    global _role
    _role = role


def _guess_role() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if "gunicorn" in sys.modules and "gunicorn.arbiter" in sys.modules:
        return "gunicorn"
    if argv0 in ("celery", "rq", "flask"):
        return "cli" if argv0 == "flask" else argv0
    return "process"


def role() -> str:
    return _role or _guess_role()


def worker_id() -> str:
    """``host:pid:role``, unique per live process and readable in a dashboard."""
    host = socket.gethostname().split(".", 1)[0][:40]
    return f"{host}:{os.getpid()}:{role()}"
