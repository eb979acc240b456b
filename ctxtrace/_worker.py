"""Who this process is, for the ``worker`` label and ``service.instance.id``.

The identity is readable (host, pid, role) and unique per process; it is
recomputed after fork, because gunicorn ``--preload`` workers start as copies
of the master. gunicorn's master is ``gunicorn-master``, its workers
``gunicorn``: the master serves its own ``/metrics`` (what it counted while
importing the app with ``--preload``) under a label of its own.
"""

from __future__ import annotations

import os
import socket
import sys

_role: str | None = None
#: Forked from a process that had gunicorn's arbiter loaded: a gunicorn worker.
_forked_from_gunicorn = False


def set_role(role: str) -> None:
    """Integrations say what this process is (a Celery worker, a CLI command...)."""
    global _role
    _role = role


def forked() -> None:
    """In a forked child, before its identity is recomputed: a master's child is a worker."""
    global _forked_from_gunicorn, _role
    if "gunicorn.arbiter" in sys.modules:
        _forked_from_gunicorn = True
    if _role == "gunicorn-master":
        _role = None


def _in_gunicorn_worker() -> bool:
    """Whether this process is a worker gunicorn forked (ctxtrace was imported after the fork).

    A worker runs its whole life inside the arbiter's ``spawn_worker``, where
    the fork returned; the master never calls it on its own stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "spawn_worker" and code.co_filename.endswith(
            os.path.join("gunicorn", "arbiter.py")
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _guess_role() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if "gunicorn" in sys.modules and "gunicorn.arbiter" in sys.modules:
        if _forked_from_gunicorn or _in_gunicorn_worker():
            return "gunicorn"
        return "gunicorn-master"
    if argv0 in ("celery", "rq", "flask"):
        return "cli" if argv0 == "flask" else argv0
    return "process"


def role() -> str:
    return _role or _guess_role()


def worker_id() -> str:
    """``host:pid:role``, unique per live process and readable in a dashboard."""
    host = socket.gethostname().split(".", 1)[0][:40]
    return f"{host}:{os.getpid()}:{role()}"
