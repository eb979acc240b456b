"""``ctxtrace run -- COMMAND...``: run a program with ctxtrace on, without touching its code.

Works for ``flask run``, ``gunicorn``, ``celery worker``, ``rq worker`` and
``python script.py``, and for the Python processes they start (see
``ctxtrace._autostart``). Options go to the command as ``CTXTRACE_*``
environment variables; ``--set spans=all`` is ``CTXTRACE_SPANS=all``. Unlike a
plain ``instrument()``, the command's processes share one Prometheus address
(``CTXTRACE_PROMETHEUS_SCRAPE=host``) unless a scrape mode or a file_sd folder
is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ctxtrace._autostart import BOOTSTRAP_DIR
from ctxtrace._config import PREFIX, Config, ConfigError

SCRAPE: Final = PREFIX + "PROMETHEUS_SCRAPE"
TARGETS_DIR: Final = PREFIX + "PROMETHEUS_TARGETS_DIR"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a command with ctxtrace on in it and in its Python child processes",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        usage="ctxtrace run [--set KEY=VALUE]... -- COMMAND [ARG...]",
    )
    parser.add_argument(
        "--set", "-s", dest="options", action="append", default=[], metavar="KEY=VALUE",
        help="a ctxtrace option for the command, e.g. spans=all (repeatable)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    parser.set_defaults(handler=run)


def environment(environ: Mapping[str, str], options: Sequence[str]) -> dict[str, str]:
    """The command's environment: the bootstrap folder first on PYTHONPATH, options set.

    Raises ``ConfigError`` for an unknown option or a bad value, before anything runs.
    """
    env = dict(environ)
    arguments: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        key = key.strip().lower().removeprefix(PREFIX.lower())
        if not sep or not key:
            raise ConfigError(item, item, "KEY=VALUE", "command line")
        arguments[key] = value
    Config.resolve(arguments)
    for key, value in arguments.items():
        env[PREFIX + key.upper()] = value
    # One address per host unless told otherwise; a file_sd folder is the per-worker
    # setup's own setting, so a command that names one keeps its endpoints per worker.
    if not env.get(SCRAPE) and not env.get(TARGETS_DIR):
        env[SCRAPE] = "host"
    here = str(BOOTSTRAP_DIR)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


def run(args: argparse.Namespace) -> int:
    command: list[str] = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("ctxtrace run: no command given (ctxtrace run -- COMMAND...)", file=sys.stderr)
        return 2
    try:
        env = environment(os.environ, args.options)
    except ConfigError as exc:
        print(f"ctxtrace run: {exc}", file=sys.stderr)
        return 2
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        print(f"ctxtrace run: {command[0]}: command not found", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(executable, command, env)
    return 0  # not reached: execve replaces this process
