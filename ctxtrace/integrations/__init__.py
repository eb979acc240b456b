"""Units of work beyond requests: tasks, jobs, commands and threads.

Each integration is a function ``install(agent)`` that hooks one library and
returns the function that unhooks it. The agent calls every installer when it
starts and every remover when it stops. An installer that fails is counted and
skipped: the rest of ctxtrace still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from ctxtrace.integrations import celery, click, rq, threads
from ctxtrace.integrations.kit import Remover

if TYPE_CHECKING:
    from ctxtrace._agent import Agent

Installer = Callable[["Agent"], Remover]

INSTALLERS: Final[tuple[tuple[str, Installer], ...]] = (
    ("threads", threads.install),
    ("click", click.install),
    ("celery", celery.install),
    ("rq", rq.install),
)


def install_all(agent: Agent) -> list[Remover]:
    """Hook every integration; a failing one is counted and left out."""
    removers: list[Remover] = []
    for name, install in INSTALLERS:
        try:
            removers.append(install(agent))
        except Exception as exc:
            agent.errors.record(f"integration.{name}", exc)
    return removers


def uninstall_all(agent: Agent, removers: Sequence[Remover]) -> None:
    """Unhook in reverse order; a failure is counted and the others still run."""
    for remove in reversed(removers):
        try:
            remove()
        except Exception as exc:
            agent.errors.record("integrations", exc)
