"""An example Flask service, a small shop, with seeded application-context faults.

It is a plain Flask app and knows nothing of ctxtrace's agent: the agent is switched on from
outside (``ctxtrace demo`` runs it under gunicorn as ``ctxtrace.example:create_app()``). The
healthy endpoints live in :mod:`.views`, one endpoint per fault in :mod:`.faults`, and
:data:`SCENARIOS` describes every fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from . import cli
from .config import default_config
from .extension import inventory
from .faults import bp as faults_bp
from .middleware import RequestTimer
from .scenarios import SCENARIOS, Scenario
from .views import bp as shop_bp

__all__ = ["APP_NAME", "SCENARIOS", "Scenario", "create_app"]

# Flask names an app after its import name; this package's never changes, unlike "__main__".
APP_NAME = __name__


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the shop. ``config`` overrides :func:`.config.default_config` key by key."""
    app = Flask(APP_NAME)
    app.config.from_mapping(default_config())
    if config is not None:
        app.config.from_mapping(config)

    inventory.init_app(app)
    # `audit` is deliberately not initialised here: scenario "extension-before-init".

    app.register_blueprint(shop_bp)
    app.register_blueprint(faults_bp)
    cli.register(app)

    # Flask's documented way to add WSGI middleware: the app object stays the WSGI callable.
    app.wsgi_app = RequestTimer(app, app.wsgi_app)  # type: ignore[method-assign]
    return app
