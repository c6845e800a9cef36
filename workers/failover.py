"""Failover without stalls on a RabbitMQ cluster: the consumer's delayed-delivery step.

Celery 5.7's ``DelayedDelivery`` consumer step (on whenever a quorum queue is configured)
declares the 28 ``celery_delayed_*`` queues and binds the task queues to them on EVERY broker
URL of the failover list, each over a new connection retried 3 times with 1 + 3 + 5 s sleeps,
and it runs again on every consumer restart. After a node dies the consumer reconnects to a
live node within milliseconds, then sits in that step retrying the dead node's URL: about 18 s
without consuming anything (measured on a 3-node cluster, docs/scaling.md).

On a cluster those exchanges, queues and bindings are cluster-wide metadata: declaring them
once, on any live node, is enough. `ClusterDelayedDelivery` does it over the consumer's own
connection, which the Connection step has just opened to a live node, with no retry loop: a
connection error while declaring propagates, so the consumer restarts and fails over to the
next node as for any other lost connection (also when the stock binding helper has grouped it
with other errors). `Consumer` is Celery's consumer with this step in place of the stock one
(``worker_consumer`` in celeryconfig.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.transport.native_delayed_delivery import (
    declare_native_delayed_delivery_exchanges_and_queues,
)

from core import events

logger = logging.getLogger(__name__)

STOCK_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
STEP = "workers.failover:ClusterDelayedDelivery"


class ClusterDelayedDelivery(DelayedDelivery):
    """Declare native delayed delivery once, over the consumer's live connection."""

    # Subclassing keeps the stock step's include_if (quorum queues detected), its
    # configuration checks and its queue binding; only start() changes.
    def start(self, c: Any) -> None:
        app = c.app
        # The stock step's private helpers (celery-types does not list them).
        self._validate_configuration(app)  # type: ignore[attr-defined]
        connection = c.connection
        started = time.monotonic()
        try:
            declare_native_delayed_delivery_exchanges_and_queues(
                connection, app.conf.broker_native_delayed_delivery_queue_type
            )
            self._bind_queues(app, connection)  # type: ignore[attr-defined]
        except c.connection_errors:
            # The node went away mid-declaration: let the consumer restart on the next node.
            raise
        except Exception as exc:  # the stock step's policy: log, keep consuming
            lost = _connection_error(exc, c.connection_errors)
            if lost is not None:
                # The stock binding collects most errors into an ExceptionGroup, which the
                # consumer would not take for a lost connection: raise the connection's own.
                raise lost from exc
            # A channel error (for example a precondition on a re-declared queue) must not stop
            # task consumption; only countdown/ETA publishes are affected.
            logger.critical(
                "native delayed delivery setup failed on %s: %r; countdown/ETA tasks will "
                "not be delivered until it succeeds on a consumer restart",
                connection.as_uri(),
                exc,
            )
            return
        logger.info(
            "native delayed delivery declared via %s in %.3fs",
            connection.as_uri(),
            time.monotonic() - started,
        )


def _connection_error(
    exc: BaseException, connection_errors: tuple[type[BaseException], ...]
) -> BaseException | None:
    """`exc` or the first error it groups that is a connection error, else None."""
    if isinstance(exc, connection_errors):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _connection_error(inner, connection_errors)
            if found is not None:
                return found
    return None


class Consumer(events.Consumer):
    """The worker's consumer (worker_consumer): `ClusterDelayedDelivery` in place of the stock
    step, on top of core/events.py's consumer, whose event connection skips confirms."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[valid-type,misc]
        default_steps: ClassVar[list[str]] = [
            STEP if step == STOCK_STEP else step for step in CeleryConsumer.Blueprint.default_steps
        ]
