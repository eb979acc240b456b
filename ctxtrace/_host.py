"""What the emitters and integrations may ask of the running agent, and nothing more.

Emitters (``telemetry/``) and integrations (``integrations/``) are handed a
``Host`` instead of the whole agent, so they cannot reach into the ledger or the
hooks, and none of them imports ``ctxtrace._agent``: the data path stays one
direction, hooks -> ledger -> events -> emitters, and the import graph has no
cycle through the agent (the import-linter contracts in ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:

    from ctxtrace._config import Config
    from ctxtrace._events import Kind, Unit
    from ctxtrace.core.guard import InternalErrors
    from ctxtrace.core.records import StatsSnapshot, UnitState


@dataclass(frozen=True, slots=True)
class UnitHandle:
    """What ``Host.begin_unit`` hands back, to pass to ``Host.end_unit``."""

    unit: UnitState | None


class Host(Protocol):
    """The running agent, as its emitters and integrations see it."""

    config: Config
    errors: InternalErrors
    #: ``host:pid:role``, the ``worker`` label; changes at fork and with the role.
    worker: str

    @property
    def running(self) -> bool:
        """Whether this agent is still the one running: a stopped agent stays quiet."""
        ...

    # -- units of work (integrations) ----------------------------------------

    def begin_unit(self, kind: str, name: str, *, defer_stale: bool = False) -> UnitHandle:
        """A unit starts on the calling thread. ``defer_stale``: look for what earlier
        units left on the thread at its end, unless a unit inside it has looked by then
        (an executor work item that serves a request names the request, not itself)."""
        ...

    def end_unit(self, handle: UnitHandle) -> None: ...

    def current_unit(self) -> Unit | None:
        """The unit running on the calling thread, if any (who starts a thread)."""
        ...

    def escaped(self, exc: BaseException) -> None:
        """``exc`` is failing the running unit: accesses whose errors led to it escaped."""
        ...

    def set_role(self, role: str) -> None:
        """Say what this process is (``celery``, ``rq``, ``cli``); renames ``worker``."""
        ...

    def refresh_worker(self) -> None:
        """Recompute ``worker`` from what is known now (gunicorn's master is found late)."""
        ...

    def flush(self, timeout_s: float) -> None:
        """Hand over what the emitters buffer (a process about to end without atexit)."""
        ...

    # -- what the ledger and the emitters counted (metrics) -------------------

    def snapshot(self) -> list[StatsSnapshot]: ...

    def drain_durations(self) -> Iterator[tuple[Kind, str, float]]: ...

    def take_depth_max(self) -> int: ...

    def repeated_accesses(self) -> list[tuple[tuple[str, ...], int]]:
        """Out-of-context accesses the ledger counted without an event, by (proxy, phase,
        outcome): a repeat at a site already reported in its window."""

    def dropped(self) -> dict[str, int]:
        """What the ledger's and the log emitter's bounds turned away, by ``what``."""
        ...
