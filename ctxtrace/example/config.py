"""Default configuration of the example shop.

Every key carries the ``SHOP_`` prefix so that it cannot collide with the agent's ``CTXTRACE_*``
keys, which may be passed to :func:`ctxtrace.example.create_app` in the same mapping.
"""

from __future__ import annotations

from typing import Any


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the defaults.

    A function rather than a module-level dict because some values are mutable (the budget
    table): two apps in one process (the test suite) must not share and mutate one dict.
    """
    return {
        # Items per page of GET /items.
        "SHOP_PAGE_SIZE": 20,
        # An item is "low on stock" below this many units.
        "SHOP_LOW_STOCK_THRESHOLD": 3,
        # Latency budget per request path, in milliseconds, checked by the RequestTimer
        # middleware. A budget of 0 makes every request to that path "slow", which is how
        # the stale-g scenario reaches the middleware's faulty slow path deterministically.
        # Paths without an entry are not checked; streamed paths must not get one (see
        # ctxtrace.example.middleware).
        "SHOP_LATENCY_BUDGETS_MS": {"/fault/stale-g": 0.0},
        # How long a view waits for the background thread it started. The tasks take
        # milliseconds; the bound only matters if one hangs, and then the view answers anyway.
        "SHOP_BACKGROUND_TIMEOUT_S": 2.0,
        # Where the report export writes: "log" or "" (not configured). Left empty on purpose:
        # the export then fails halfway, which is the push-no-pop scenario.
        "SHOP_REPORT_SINK": "",
    }
