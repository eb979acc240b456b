"""Names the host chooses (apps, endpoints, threads, units of work), made safe for telemetry.

They reach log lines, span attributes, metric labels and the text report, so
every one goes through ``safe_name``: cut to a bounded length, with control
characters (C0, DEL and C1, such as ESC, BEL, CR, LF and the one-byte CSI
``\\x9b``), bidirectional controls (U+202E and its kin, which reorder what a
terminal or an editor shows), line and paragraph separators and lone
surrogates replaced by ``?``. A terminal escape in an endpoint or thread name
must not reach a person's terminal through a log line or the report.
"""

from __future__ import annotations

import re
from typing import Final

MAX_NAME: Final = 120

#: What must never reach a terminal or a log line from a name the host chose.
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f"  # C0, DEL, C1
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional controls
    "\u2028\u2029"  # line and paragraph separators
    "\ud800-\udfff]"  # lone surrogates (no encoding can write them)
)


def safe_name(raw: object, limit: int = MAX_NAME) -> str:
    """``raw`` as text of at most ``limit`` characters, unsafe characters as ``?``."""
    text = raw if isinstance(raw, str) else str(raw)
    return _UNSAFE.sub("?", text[:limit]) or "?"


def printable(text: str) -> str:
    """``text`` with every unsafe character shown as its escape (``\\x1b``, ``\\u202e``).

    For output meant for a person (the text report): nothing is lost, nothing acts.
    """
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
