"""Click commands (the ``flask`` CLI, ``app.cli``, plain click groups) as units of work.

The unit begins in ``Command.invoke`` and ends when the command's click context
closes, not when ``invoke`` returns: ``flask.cli.with_appcontext`` hands its app
context to ``ctx.with_resource``, which pops it at close. Registered first, the
end runs last (the exit stack unwinds in reverse), after those pops, so a
command under ``with_appcontext`` is clean and one that leaves a context pushed
is leaked, named after the command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ctxtrace import _worker
from ctxtrace.core.patching import put_wrapper
from ctxtrace.integrations.kit import tell_escaped

if TYPE_CHECKING:
    from ctxtrace._host import Host, UnitHandle


def install(host: Host) -> Callable[[], None]:
    original = vars(click.Command)["invoke"]

    def invoke(self: click.Command, ctx: click.Context) -> Any:
        __tracebackhide__ = __traceback_hide__ = True  # pytest, Werkzeug: not the app's frame
        if host.running:
            try:
                _begin(host, self, ctx)
            except Exception as exc:
                host.errors.record("click", exc)
        try:
            return original(self, ctx)
        except BaseException as exc:
            tell_escaped(host, exc, "click")
            raise

    return put_wrapper(click.Command, "invoke", invoke, original)


def _begin(host: Host, command: click.Command, ctx: click.Context) -> None:
    if ctx.parent is None and _worker.role() == "process" and _is_the_program(ctx):
        host.set_role("cli")
    handle = host.begin_unit("command", command.name or ctx.info_name or "?")
    try:
        ctx.call_on_close(lambda: _end(host, handle))
    except Exception:
        _end(host, handle)
        raise


def _is_the_program(ctx: click.Context) -> bool:
    """Whether this root command is what the process runs, not a call from other code.

    ``Command.main`` names the root context after the program (``myadmin``,
    ``python -m shop.admin``); a test runner or a caller passing ``prog_name``
    names it otherwise, and does not make this process a CLI. ``flask``,
    ``celery`` and ``rq`` are recognised by name already.
    """
    detect = getattr(click.utils, "_detect_program_name", None)
    try:
        return detect is not None and ctx.info_name == detect()
    except Exception:
        return False


def _end(host: Host, handle: UnitHandle) -> None:
    try:
        if host.running:
            host.end_unit(handle)
    except Exception as exc:
        host.errors.record("click", exc)
