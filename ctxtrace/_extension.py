"""The Flask extension: ``CtxTrace(app)`` or ``CtxTrace().init_app(app)``.

The hooks are process-wide either way (contexts of every app are watched);
the extension exists for people who configure through ``app.config``. Options
passed to the constructor beat ``app.config["CTXTRACE_*"]``, which beats the
environment.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from ctxtrace import _agent


class CtxTrace:
    """Flask extension that turns ctxtrace on from an app's configuration."""

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.options = options
        self.agent: _agent.Agent | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Start the agent with this app's ``CTXTRACE_*`` keys (once per process)."""
        self.agent = _agent.start(self.options, app.config) or _agent.current()
        app.extensions["ctxtrace"] = self
