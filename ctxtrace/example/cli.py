"""Admin commands of the shop, one right and one seeded fault.

Both are registered on ``app.cli`` by :func:`register` and also collected in :data:`admin`, a
plain click group for running them outside the ``flask`` command (``python -m
ctxtrace.example``), the way a cron job or a container entrypoint would.

* ``seed-data`` is wrapped in :func:`flask.cli.with_appcontext`, which pushes an app context
  (loading the app if needed) before the callback runs.
* ``report-config`` is a plain ``click.command`` added with ``app.cli.add_command``. Unlike
  ``@app.cli.command``, ``add_command`` does not wrap the callback in ``with_appcontext``, so its
  ``current_app`` access fails with Flask's "Working outside of application context" and the
  command exits with status 1 (scenario "cli-report-config"). Nothing catches it.

Under the ``flask`` command itself the fault stays hidden: since Flask 2.2 ``FlaskGroup`` pushes
an app context before looking up any command of the app. It shows wherever ``app.cli`` or the
command is invoked by something else: :data:`admin`, or ``app.test_cli_runner().invoke()``.
"""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from .extension import inventory
from .models import DEMO_ITEMS, demo_items


@click.command("seed-data")
@click.option(
    "--count",
    type=click.IntRange(1, 10_000),
    default=len(DEMO_ITEMS),
    show_default=True,
    help="How many items the table holds afterwards.",
)
# Flask 2.3 ships with_appcontext unannotated (3.0 added the types), hence the ignore there.
@with_appcontext  # type: ignore[untyped-decorator, unused-ignore]
def seed_data(count: int) -> None:
    """Replace the item table with COUNT demo items."""
    # The table lives in memory, so this seeds the app of this process only: what a shell
    # session or a test wants, and enough to show a command that runs in an app context.
    seeded = inventory.store().replace_all(demo_items(count))
    click.echo(f"seeded {seeded} items into {current_app.name}")


@click.command("report-config")
def report_config() -> None:
    """Print the shop's SHOP_* settings (fails: no app context, see the module docstring)."""
    config = current_app.config
    for key in sorted(k for k in config if k.startswith("SHOP_")):
        click.echo(f"{key}={config[key]!r}")


@click.group("shop-admin")
def admin() -> None:
    """Shop admin commands, runnable without the flask command."""


admin.add_command(seed_data)
admin.add_command(report_config)


def register(app: Flask) -> None:
    """Add both commands to ``app.cli``."""
    app.cli.add_command(seed_data)
    app.cli.add_command(report_config)
