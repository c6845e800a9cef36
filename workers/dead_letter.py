"""Declares the dead-letter exchange and queue every time the consumer (re)connects.

Task queues carry ``x-dead-letter-exchange``; RabbitMQ moves a message there once it has been
delivered more than the queue's delivery limit, or when a worker rejects it without requeue
(unknown task name, refused content type). Declaring the target here means it exists before any
worker can dead-letter anything, on a fresh broker or after a broker lost its definitions.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from kombu import Exchange, Queue


def dead_letter_entities(conf: Any) -> tuple[Exchange, Queue]:
    """The exchange and queue named in the configuration."""
    exchange = Exchange(conf.conveyor_dead_letter_exchange, type="topic", durable=True)
    queue = Queue(
        conf.conveyor_dead_letter_queue,
        exchange,
        # Dead-lettered messages keep their original routing key (the task queue's name).
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    return exchange, queue


class DeclareDeadLetterQueue(bootsteps.StartStopStep):
    """Consumer step: declare the dead-letter exchange and queue on the consumer's connection."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        _, queue = dead_letter_entities(c.app.conf)
        with c.connection.channel() as channel:
            queue.bind(channel).declare()
