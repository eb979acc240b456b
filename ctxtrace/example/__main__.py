"""``python -m ctxtrace.example [seed-data|report-config]``: the admin commands without flask.

The app is loaded by :class:`flask.cli.ScriptInfo` only when a command asks for it through
``with_appcontext``, exactly as under the ``flask`` command, so ``seed-data`` works here while
``report-config`` shows its fault.
"""

from __future__ import annotations

from flask.cli import ScriptInfo

from . import create_app
from .cli import admin

if __name__ == "__main__":
    admin.main(obj=ScriptInfo(create_app=create_app), prog_name="python -m ctxtrace.example")
