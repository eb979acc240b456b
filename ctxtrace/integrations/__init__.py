"""Units of work beyond requests: tasks, jobs, commands and threads.

Each integration is a function ``install(host)`` that hooks one library and
returns the function that unhooks it. The host calls every installer when it
starts and every remover when it stops. An installer that fails is counted and
skipped: the rest of ctxtrace still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Final

from ctxtrace.integrations import celery, click, executors, rq, threads
from ctxtrace.integrations.kit import Remover, on_import

if TYPE_CHECKING:
    from ctxtrace._host import Host

Installer = Callable[["Host"], Remover]


def _gunicorn_master(host: Host) -> Remover:
    """Under ``ctxtrace run``, gunicorn's master starts as a plain process: once it has
    loaded gunicorn's arbiter its label (and target file) say ``gunicorn-master``."""

    def loaded(_module: ModuleType) -> Remover:
        host.refresh_worker()
        return lambda: None

    return on_import(
        "gunicorn.arbiter", loaded, lambda exc: host.errors.record("integration.gunicorn", exc)
    )


INSTALLERS: Final[tuple[tuple[str, Installer], ...]] = (
    ("threads", threads.install),
    ("executors", executors.install),
    ("click", click.install),
    ("celery", celery.install),
    ("rq", rq.install),
    ("gunicorn", _gunicorn_master),
)


def install_all(host: Host) -> list[Remover]:
    """Hook every integration; a failing one is counted and left out."""
    removers: list[Remover] = []
    for name, install in INSTALLERS:
        try:
            removers.append(install(host))
        except Exception as exc:
            host.errors.record(f"integration.{name}", exc)
    return removers


def uninstall_all(host: Host, removers: Sequence[Remover]) -> None:
    """Unhook in reverse order; a failure is counted and the others still run."""
    for remove in reversed(removers):
        try:
            remove()
        except Exception as exc:
            host.errors.record("integrations", exc)
