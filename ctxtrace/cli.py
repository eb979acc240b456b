"""The ``ctxtrace`` command.

Each subcommand lives in its own module, listed in ``COMMANDS``, which defines
``register(subparsers)``: it adds its parser and sets a ``handler`` default, a
function from the parsed arguments to the exit status.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import Final

#: Modules that each add one subcommand.
COMMANDS: Final = (
    "ctxtrace.commands.run",
    "ctxtrace.commands.check_imports",
    "ctxtrace.commands.demo",
    "ctxtrace.commands.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxtrace",
        description="Watch every Flask application and request context of a program.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctxtrace`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)
