"""Settings copied out of the app config when this module is imported: a seeded fault.

The module body reads ``current_app.config`` at import time. Imported while a request is being
served, that happens to work, and silently freezes the values of whichever app was current at
that moment. Imported anywhere else (a worker thread, a script, a tool that imports every
module of the package) it fails with Flask's "Working outside of application context".

Nothing in the shop imports it at module level. :func:`ctxtrace.example.worker.load_lazy_settings`
imports it from a background thread, which is scenario "import-time". The fix is what
:mod:`ctxtrace.example.models` does: read the config inside the function that needs it.
"""

from __future__ import annotations

from flask import current_app

PAGE_SIZE: int = current_app.config["SHOP_PAGE_SIZE"]
LOW_STOCK_THRESHOLD: int = current_app.config["SHOP_LOW_STOCK_THRESHOLD"]
