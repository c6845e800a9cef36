"""The dead-letter exchange and queue, and dead-lettering a message with Conveyor's reason.

Task queues carry ``x-dead-letter-exchange``; RabbitMQ moves a message there once it has been
delivered more than the queue's delivery limit, or when a worker rejects it without requeue.
Declaring the target every time the consumer (re)connects means it exists before any worker can
dead-letter anything, on a fresh broker or after a broker lost its definitions.

A rejected message cannot gain headers. When the worker itself gives up on a message (bad input
it refuses, a task whose retries ran out), `dead_letter` publishes a copy carrying the reason
headers of core/dead_letters.py to the dead-letter exchange, waits for the broker's confirm,
and only then acks the original. A crash between the two leaves the original unacked: it is
delivered again and dead-lettered again, so the worst case is a duplicate dead letter, never a
lost one. When the copy cannot be published, the original is rejected as before and the broker
dead-letters it (reason ``rejected``, without the details).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from kombu import Exchange, Queue

from core.dead_letters import reason_headers

logger = logging.getLogger(__name__)

#: TEST ONLY: when set, the worker process exits right after the broker confirmed a
#: dead-letter copy and before it acks the original: the worst moment for a crash
#: (tests/chaos/test_dead_letter_reasons.py). Never set it in a deployment.
EXIT_AFTER_COPY_ENV = "CONVEYOR_TEST_EXIT_AFTER_DEAD_LETTER_COPY"
#: Properties the copy keeps. Not `expiration`: the copy would expire in the dead-letter queue.
COPIED_PROPERTIES = ("correlation_id", "reply_to", "priority", "message_id", "type")
#: Native delayed delivery prefixes the routing key with 28 binary digits of the delay.
_DELAYED_PREFIX = re.compile(r"^(?:[01]\.){28}")


@dataclass(frozen=True)
class Why:
    """Why a worker dead-letters a message: Conveyor's reason and the exception behind it."""

    reason: str
    exception: str
    message: str


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


def queue_of(consumer: Any, message: Any) -> str:
    """The queue `message` was consumed from (its consumer tag), else its routing key."""
    delivery = getattr(message, "delivery_info", None) or {}
    tags = getattr(getattr(consumer, "task_consumer", None), "_active_tags", None) or {}
    tag = delivery.get("consumer_tag")
    for queue, queue_tag in tags.items():
        if tag is not None and queue_tag == tag:
            return str(queue)
    return _DELAYED_PREFIX.sub("", str(delivery.get("routing_key") or "")) or "-"


def dead_letter(consumer: Any, message: Any, why: Why) -> None:
    """Publish a confirmed copy of `message` with `why` to the dead-letter exchange; ack it."""
    queue = queue_of(consumer, message)
    try:
        _publish_copy(consumer.app, message, why, queue, str(consumer.hostname))
    except Exception as exc:
        logger.warning(
            "could not publish the dead-letter copy (%r); rejecting the message instead", exc
        )
        message.reject(requeue=False)
        return
    if os.environ.get(EXIT_AFTER_COPY_ENV):
        os._exit(70)
    message.ack()


def _publish_copy(app: Any, message: Any, why: Why, queue: str, worker: str) -> None:
    headers = {
        **(message.headers or {}),
        **reason_headers(why.reason, why.exception, why.message, worker=worker, queue=queue),
    }
    properties = message.properties or {}
    timeout = float(app.conf.conveyor_publish_timeout)
    # The app's producer connections confirm every publish (broker_transport_options), so
    # publish returns only once the broker has taken the copy, and raises otherwise.
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange=app.conf.conveyor_dead_letter_exchange,
            routing_key=queue,
            headers=headers,
            content_type=message.content_type or "application/octet-stream",
            content_encoding=message.content_encoding or "binary",
            delivery_mode=2,
            retry=False,
            timeout=timeout,
            confirm_timeout=timeout,
            **{k: properties[k] for k in COPIED_PROPERTIES if properties.get(k) is not None},
        )


class DeclareDeadLetterQueue(bootsteps.StartStopStep):
    """Consumer step: declare the dead-letter exchange and queue on the consumer's connection."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        _, queue = dead_letter_entities(c.app.conf)
        with c.connection.channel() as channel:
            queue.bind(channel).declare()
