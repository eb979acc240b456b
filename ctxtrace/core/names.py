"""Names the host chooses (apps, threads, units of work), made safe for telemetry.

They reach log lines, span attributes and metric labels, so each is cut to a
bounded length and stripped of control characters (a terminal escape in a thread
name must not reach a person's terminal through a log line).
"""

from __future__ import annotations

import re
from typing import Final

MAX_NAME: Final = 120
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def safe_name(raw: object) -> str:
    """``raw`` as text of at most ``MAX_NAME`` characters, control characters as ``?``."""
    return _CONTROL.sub("?", str(raw)[:MAX_NAME]) or "?"
