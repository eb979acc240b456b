"""Two small Flask extensions in the ``init_app`` style.

Each is a module-level instance shared by every app of the process; its per-app state lives in
``app.extensions`` and is found again through ``current_app``, so the instance itself never
holds an app. That is what lets one process host several apps (the test suite does).

``inventory`` is initialised by the factory. ``audit`` never is: it is the scenario
"extension used before init_app" (see :mod:`ctxtrace.example.scenarios`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from flask import Flask, current_app, g

from .models import DEMO_ITEMS, ItemStore

# Name of the attribute on `g` holding this context's inventory session.
_SESSION_ATTR = "inventory_session"


@dataclass
class InventoryState:
    """Per-app state of :class:`Inventory`."""

    store: ItemStore
    open_sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Inventory:
    """Gives views the item store, checked out per app context like a database session.

    The checkout is returned when the app context is torn down. A context that is pushed and
    never popped therefore keeps its session open for good: :meth:`open_sessions` is how the
    shop makes a leaked context visible without any agent.
    """

    def init_app(self, app: Flask) -> None:
        """Create this app's store and register the teardown that returns sessions."""
        app.extensions["inventory"] = InventoryState(store=ItemStore(DEMO_ITEMS))
        app.teardown_appcontext(self._release_session)

    def store(self) -> ItemStore:
        """The active app's store, without opening a session (CLI commands, reports)."""
        return self._state().store

    def session(self) -> ItemStore:
        """The store, checked out once for the active app context."""
        session: ItemStore | None = g.get(_SESSION_ATTR)
        if session is None:
            state = self._state()
            with state.lock:
                state.open_sessions += 1
            session = state.store
            setattr(g, _SESSION_ATTR, session)
        return session

    def open_sessions(self) -> int:
        """How many app contexts of the active app hold a session right now."""
        state = self._state()
        with state.lock:
            return state.open_sessions

    def _state(self) -> InventoryState:
        state: InventoryState = current_app.extensions["inventory"]
        return state

    def _release_session(self, exc: BaseException | None) -> None:
        # Teardown may run more than once for one context object (stream_with_context pushes
        # the request's context again while the body streams), hence pop with a default.
        if g.pop(_SESSION_ATTR, None) is not None:
            state = self._state()
            with state.lock:
                state.open_sessions -= 1


@dataclass
class AuditTrail:
    """Per-app state of :class:`Audit`: the latest entries, bounded so memory cannot grow."""

    entries: deque[str] = field(default_factory=lambda: deque(maxlen=1000))


class Audit:
    """Append-only audit trail of one app.

    :meth:`record` finds the trail through ``current_app``, so it needs an app context *and* an
    app that went through :meth:`init_app`. Without a context Flask raises "Working outside of
    application context"; inside one, an app that was never initialised gives ``KeyError``.
    """

    def init_app(self, app: Flask) -> None:
        """Create this app's trail."""
        app.extensions["audit"] = AuditTrail()

    def record(self, action: str) -> None:
        """Append ``action`` to the active app's trail."""
        trail: AuditTrail = current_app.extensions["audit"]
        trail.entries.append(action)


inventory = Inventory()

# Deliberately never passed through init_app by create_app: scenario "extension-before-init".
audit = Audit()
