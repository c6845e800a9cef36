"""`celery -A tasks exporter`: serve /metrics."""

from __future__ import annotations

import logging
import threading

import click
from celery import Celery
from celery.bin.base import CeleryCommand
from prometheus_client import start_http_server

from monitoring.exporter.collector import build_registry

logger = logging.getLogger(__name__)


@click.command(cls=CeleryCommand)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9808, show_default=True, help="Port of /metrics.")
@click.option(
    "--rabbitmq-api",
    envvar="CONVEYOR_RABBITMQ_API",
    default=None,
    help="RabbitMQ management API, e.g. http://user:pw@rabbitmq:15672/api/ "
    "(adds unacked and delayed counts). Default: conveyor_rabbitmq_api.",
)
@click.pass_context
def exporter(ctx: click.Context, address: str, port: int, rabbitmq_api: str | None) -> None:
    """Serve Conveyor's Prometheus metrics (queues, dead letters, waits, failures)."""
    app: Celery = ctx.obj.app
    registry, events = build_registry(app, rabbitmq_api or app.conf.get("conveyor_rabbitmq_api"))
    stop = threading.Event()
    assert events is not None
    thread = threading.Thread(
        target=events.consume_forever, args=(app, stop), name="events", daemon=True
    )
    thread.start()
    server, _ = start_http_server(port, addr=address, registry=registry)
    logger.info("exporter serving http://%s:%s/metrics", address, server.server_port)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.shutdown()
