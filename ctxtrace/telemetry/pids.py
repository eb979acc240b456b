"""Whether a process still runs, from its pid alone.

Workers clean up after workers that died without doing so (their file_sd
targets), and tests wait for processes that are not their children to go. (The
example shop's launcher keeps its own copy: the example imports nothing of the
agent, by design.)
"""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
