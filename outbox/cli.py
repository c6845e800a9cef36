"""`celery -A tasks outbox relay|migrate`: run the relay, create the outbox table.

Registered in pyproject.toml under ``celery.commands``; the database is CONVEYOR_OUTBOX_URL
(or CONVEYOR_OUTBOX_URL_FILE), read by celeryconfig as ``conveyor_outbox_url``.
"""

from __future__ import annotations

import logging
import signal
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import psycopg

from outbox.relay import Relay, Settings

#: Creates the table, its indexes and the NOTIFY trigger; shown in docs/outbox.md.
SCHEMA = Path(__file__).with_name("schema.sql")


def settings_of(app: Any) -> Settings:
    try:
        return Settings.from_app(app)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def migrate_database(url: str) -> None:
    """Run schema.sql (idempotent) in one transaction."""
    with psycopg.connect(url, connect_timeout=10) as db:
        db.execute(SCHEMA.read_text().encode())


@click.group(name="outbox")
def outbox() -> None:
    """Transactional enqueue: publish committed outbox rows (docs/outbox.md)."""


@outbox.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create the conveyor_outbox table, its indexes and trigger (safe to run again)."""
    migrate_database(settings_of(ctx.obj.app).url)
    click.echo("conveyor_outbox is ready")


@outbox.command()
@click.option(
    "--include",
    multiple=True,
    help="Module of tasks to import (as the worker's --include); not needed to publish them.",
)
@click.option(
    "--if-configured",
    is_flag=True,
    help="Without CONVEYOR_OUTBOX_URL, idle instead of failing (the Procfile's `honcho start`).",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def relay(ctx: click.Context, include: tuple[str, ...], if_configured: bool, loglevel: str) -> None:
    """Publish committed outbox rows until SIGTERM or SIGINT (the batch in hand finishes)."""
    app: Any = ctx.obj.app
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(message)s")
    if if_configured and not app.conf.conveyor_outbox_url:
        logging.getLogger(__name__).info("no CONVEYOR_OUTBOX_URL: the outbox relay idles")
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
        return
    for module in include:
        import_module(module)
    app.loader.import_default_modules()
    runner = Relay(app, settings_of(app))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop())
    logging.getLogger(__name__).info("outbox relay started")
    runner.run()
