"""The table of seeded context faults: what triggers each, why it happens, how to fix it.

``ctxtrace demo`` drives the triggers and the report prints cause and fix next to what the agent
saw, so the sentences here are written for someone reading that report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AnomalyName = Literal["leaked", "wrong_pop", "stale_context", "out_of_context_access"]
"""The anomaly names a scenario may expect (ctxtrace reports out-of-context access as an event
type of its own; here it is named like the others)."""

ANOMALY_NAMES: tuple[AnomalyName, ...] = (
    "leaked",
    "wrong_pop",
    "stale_context",
    "out_of_context_access",
)


@dataclass(frozen=True)
class Scenario:
    """One seeded fault of the example shop."""

    id: str
    kind: Literal["http", "cli"]
    # An HTTP path (GET) for kind "http". For kind "cli" a command of app.cli, to run as
    # `python -m ctxtrace.example <trigger>` or `app.test_cli_runner().invoke(args=[trigger])`:
    # the flask command pushes an app context for every app command and hides the fault.
    trigger: str
    cause: str
    # Expected on every supported Flask version; where the symptom differs between versions,
    # `cause` says how.
    anomalies: tuple[AnomalyName, ...]
    fix: str
    # A request to send after the trigger, on the same worker thread, to show the symptom.
    follow_up: str | None = None
    # An endpoint running the corrected code, where the shop has one.
    fixed_by: str | None = None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        id="thread-config",
        kind="http",
        trigger="/fault/thread-config",
        cause=(
            "A view starts a background thread that reads current_app.config, and a new thread "
            "has no app context."
        ),
        anomalies=("out_of_context_access",),
        fix=(
            "Pass the app (current_app._get_current_object()) or the config values to the "
            "thread and read them inside `with app.app_context():`."
        ),
        fixed_by="/ok/thread-config",
    ),
    Scenario(
        id="push-no-pop",
        kind="http",
        trigger="/fault/push-no-pop",
        cause=(
            "A report job pushes an app context by hand and fails before its ctx.pop(), so the "
            "context is never popped and its teardown (returning the inventory session) never runs."
        ),
        anomalies=("leaked",),
        fix="Use `with app.app_context():` so the pop runs even when the job fails.",
    ),
    Scenario(
        id="import-time",
        kind="http",
        trigger="/fault/import-time",
        cause=(
            "A module reads current_app.config at module level and is first imported from a "
            "worker thread, where no app context exists."
        ),
        anomalies=("out_of_context_access",),
        fix="Do not touch current_app at module level: read the config inside the function "
        "that needs it.",
    ),
    Scenario(
        id="extension-before-init",
        kind="http",
        trigger="/fault/extension-before-init",
        cause=(
            "The module-level `audit` extension was never given to init_app and is used from a "
            "writer thread, so its current_app lookup has no app context (and no state to find)."
        ),
        anomalies=("out_of_context_access",),
        fix=(
            "Call audit.init_app(app) in the factory and write audit entries from the request "
            "or inside `with app.app_context():`."
        ),
    ),
    Scenario(
        id="wrong-order",
        kind="http",
        trigger="/fault/wrong-order",
        cause=(
            "Two app contexts are pushed and then popped in push order, so the first pop is "
            "not of the active context (up to Flask 3.1 that pop also drops the newer context "
            "from the stack without its teardown)."
        ),
        anomalies=("wrong_pop",),
        fix="Nest `with app.app_context():` blocks so contexts are popped newest first.",
    ),
    Scenario(
        id="stale-g",
        kind="http",
        trigger="/fault/stale-g",
        cause=(
            "The RequestTimer middleware pushes an app context around requests to paths with a "
            "latency budget and returns early, without popping it, when a request is over "
            "budget, so the context stays on the worker thread under the requests that follow "
            "(up to Flask 3.1 they even reuse it, and see the g of the slow request)."
        ),
        anomalies=("leaked", "stale_context"),
        fix=(
            "Wrap the middleware body in `with app.app_context():` and do not rely on the "
            "request reusing the middleware's context."
        ),
        follow_up="/whoami",
    ),
    Scenario(
        id="cli-report-config",
        kind="cli",
        trigger="report-config",
        cause=(
            "A plain click command added with app.cli.add_command reads current_app without "
            "with_appcontext, so outside the flask command no app context exists."
        ),
        anomalies=("out_of_context_access",),
        fix="Decorate the command with @with_appcontext, or define it with @app.cli.command.",
    ),
)
"""Every seeded fault, in the order the demo runs them."""
