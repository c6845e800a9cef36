"""`celery -A tasks console --address ADDR --port PORT`: serve the Conveyor console."""

from __future__ import annotations

import asyncio
import logging

import click
from celery import Celery
from celery.bin.base import CeleryCommand

from console.auth import Authenticator, accounts_from_environment, check_access
from console.sources import Sources
from console.web import Context, application

logger = logging.getLogger(__name__)


async def serve(ctx: Context, address: str, port: int) -> None:
    application(ctx).listen(port, address=address)
    logger.info("console serving http://%s:%s/", address, port)
    await asyncio.Event().wait()


@click.command(cls=CeleryCommand)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=5556, show_default=True, help="Port to serve.")
@click.pass_context
def console(ctx: click.Context, address: str, port: int) -> None:
    """Serve the console: batches, schedules, dead letters and queues, with actions."""
    accounts = accounts_from_environment()
    check_access(address, accounts)
    app: Celery = ctx.obj.app
    app.loader.import_default_modules()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s] %(message)s")
    sources = Sources(app)
    sources.snapshot.start()
    try:
        asyncio.run(serve(Context(sources, Authenticator(accounts)), address, port))
    except KeyboardInterrupt:
        pass
    finally:
        sources.snapshot.stop()
