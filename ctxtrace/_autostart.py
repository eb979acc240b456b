"""Turning ctxtrace on at interpreter start-up, for ``ctxtrace run -- COMMAND...``.

``ctxtrace run`` puts ``ctxtrace/_bootstrap`` first on ``PYTHONPATH``; Python
imports the ``sitecustomize`` there at start-up in the command's process and in
every Python process it starts (``flask run``'s reloader child, Celery and RQ
workers, ``subprocess`` calls), since they inherit the environment. Forked
children (gunicorn workers) inherit the running agent instead and re-initialise
it after the fork.

The ``sitecustomize`` it shadows (a distribution's, a virtualenv's, or the one
``opentelemetry-instrument`` installs the same way) still runs, first, so that
providers a distro configures exist before ctxtrace looks for them. Python in
isolated mode (``-I``) or without ``site`` (``-S``) ignores all of this.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Final

BOOTSTRAP_DIR: Final = Path(__file__).resolve().with_name("_bootstrap")


def _chain() -> None:
    """Run the ``sitecustomize`` that ours hides, if there is one."""
    here = str(BOOTSTRAP_DIR)
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def boot() -> None:
    """Chain to the hidden ``sitecustomize``, then instrument; never raises."""
    try:
        _chain()
    except Exception as exc:
        print(f"ctxtrace: the shadowed sitecustomize failed: {exc!r}", file=sys.stderr)
    try:
        # Imported here, inside the guard: a broken install must not stop the command.
        import ctxtrace  # noqa: PLC0415

        if not ctxtrace.is_instrumented():
            ctxtrace.instrument()
    except Exception as exc:
        # The command must run even if ctxtrace cannot.
        print(f"ctxtrace: not enabled in this process: {exc!r}", file=sys.stderr)
