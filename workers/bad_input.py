"""Bad input is dead-lettered, logged with its reason and counted, never silently dropped.

Celery acks and drops a message whose body cannot be decoded (truncated JSON, bad compression,
hostile nesting): Consumer.on_decode_error logs it and calls ``message.ack()``. This consumer
step replaces that callback with one that rejects the message without requeue, so RabbitMQ
moves it to the dead-letter exchange (x-death reason ``rejected``), where `celery -A tasks dlq`
can show it. Messages Celery already rejects (no task header, unknown task name, refused content
type such as pickle, malformed protocol fields) are counted and logged through its
``task_rejected`` and ``task_unknown`` signals.

Every rejection writes one line ``message rejected reason=<reason> total=<n>``, the totals
per reason answer ``celery -A tasks inspect conveyor_rejections``, and a ``conveyor-rejected``
event (reason, queue) goes out with the task events, which the exporter counts as
``conveyor_messages_rejected_total`` (monitoring/exporter/).

The step also declares the alternate exchange of the task exchange and its queue, so a message
published to ``conveyor`` with a routing key that matches no queue is kept, not dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from celery import bootsteps, signals
from celery.worker.control import inspect_command
from kombu import Exchange, Queue

logger = logging.getLogger(__name__)

#: Rejections per reason since the worker started (read by `inspect conveyor_rejections`).
REJECTIONS: Counter[str] = Counter()
_lock = threading.Lock()
#: Bytes of a rejected body shown in the log: enough to recognise it, never a huge payload.
PREVIEW_BYTES = 120
#: Event type of one rejection, sent through the worker's event dispatcher (fields: reason,
#: queue). Its own group, so Flower's worker and task views ignore it; it needs
#: worker_send_task_events, as every other event the exporter reads.
REJECTED_EVENT = "conveyor-rejected"
#: The worker's consumer, whose event dispatcher sends REJECTED_EVENT (set by the step).
_consumer: Any = None


def count_rejection(reason: str, message: Any, detail: object = "") -> int:
    """Count one rejected message and log it with its reason; returns the new total."""
    with _lock:
        REJECTIONS[reason] += 1
        total = REJECTIONS[reason]
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    body = getattr(message, "body", b"") or b""
    _send_event(reason, str(delivery.get("routing_key") or "-"))
    logger.error(
        "message rejected reason=%s total=%d task=%s id=%s queue=%s content_type=%s "
        "size=%d detail=%.300r preview=%r",
        reason,
        total,
        headers.get("task", "-") if isinstance(headers, dict) else "-",
        headers.get("id", "-") if isinstance(headers, dict) else "-",
        delivery.get("routing_key", "-"),
        getattr(message, "content_type", None) or "-",
        len(body),
        str(detail),
        bytes(body[:PREVIEW_BYTES]) if isinstance(body, bytes | bytearray) else str(body)[:120],
    )
    return total


def _send_event(reason: str, queue: str) -> None:
    """Tell the exporter (through the event stream); the log line and counter stand anyway."""
    dispatcher = getattr(_consumer, "event_dispatcher", None)
    if dispatcher is None:
        return
    try:
        dispatcher.send(REJECTED_EVENT, reason=reason, queue=queue)
    except Exception as exc:
        logger.warning("could not send the %s event: %r", REJECTED_EVENT, exc)


def dead_letter_undecodable(message: Any, exc: BaseException) -> None:
    """Replacement for Consumer.on_decode_error: reject (dead-letter) instead of ack (drop)."""
    reason = "content_disallowed" if type(exc).__name__ == "ContentDisallowed" else "undecodable"
    count_rejection(reason, message, f"{type(exc).__name__}: {exc}")
    message.reject(requeue=False)


def protocol_problem(message: Any) -> str | None:
    """What makes a protocol-2 task message unusable, or None.

    Celery 5.7 accepts a message whose ``id`` header is missing, or whose ``timelimit`` is not a
    pair, and then never acknowledges it: the worker holds it (and, at prefetch 1, stops taking
    work) until RabbitMQ's consumer_timeout closes the channel and the worker exits with
    PRECONDITION_FAILED (found by test_b9). Such messages are rejected before Celery sees them.
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # not protocol 2: Celery's own checks apply
    if not isinstance(headers.get("task"), str):
        return f"task header must be a string, got {headers.get('task')!r:.80}"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        return f"id header must be a non-empty string, got {task_id!r:.80}"
    retries = headers.get("retries", 0)
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        return f"retries header must be an integer, got {retries!r:.80}"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in limits
        )
    ):
        return f"timelimit header must be [hard, soft] seconds or null, got {limits!r:.80}"
    return None


def guard_task_handler(c: Any) -> None:
    """Make every message Celery fails to turn into a request a rejection, not a worker exit.

    Celery's task handler assumes a decodable, well-formed message. A message with a task
    header but no content type reaches ``'args' in message.payload`` with bytes and raises
    TypeError inside the event loop: "Unrecoverable error", the worker exits, and the message
    is redelivered to the next worker (celery 5.7, found by test_b5). The guard wraps the
    handler the event loop installs; connection errors still propagate, as Celery expects.
    """
    create = c.create_task_handler
    connection_errors = tuple(c.connection_errors)

    def create_guarded(*args: Any, **kwargs: Any) -> Any:
        handler = create(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = protocol_problem(message)
            if problem:
                count_rejection("malformed", message, problem)
                message.reject(requeue=False)
                return None
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                count_rejection("malformed", message, f"{type(exc).__name__}: {exc}")
                if not message.acknowledged:
                    message.reject(requeue=False)
                return None

        return on_task_received

    c.create_task_handler = create_guarded


def unroutable_entities(conf: Any) -> tuple[Exchange, Queue]:
    exchange = Exchange(conf.conveyor_unroutable_exchange, type="fanout", durable=True)
    queue = Queue(
        conf.conveyor_unroutable_queue,
        exchange,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
    return exchange, queue


class DeadLetterBadInput(bootsteps.StartStopStep):
    """Consumer step: undecodable bodies go to the dead-letter queue; unroutable ones are kept."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        # Set before the Tasks step builds the task consumer, which reads this attribute.
        c.on_decode_error = dead_letter_undecodable
        guard_task_handler(c)

    def start(self, c: Any) -> None:
        global _consumer
        _consumer = c
        _, queue = unroutable_entities(c.app.conf)
        with c.connection.channel() as channel:
            queue.bind(channel).declare()


def _on_rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    if exc is None:
        reason = "not_a_task"  # no Celery task header: a plain message on a task queue
    elif type(exc).__name__ == "ContentDisallowed":
        reason = "content_disallowed"
    else:
        reason = "invalid_task"
    count_rejection(reason, message, exc if exc is not None else "no task header")


def _on_unknown(sender: Any = None, message: Any = None, name: str = "", **_: Any) -> None:
    count_rejection("unknown_task", message, f"no task named {name!r} is registered")


@inspect_command()
def conveyor_rejections(state: Any) -> dict[str, int]:
    """Rejected messages per reason since this worker started."""
    with _lock:
        return dict(REJECTIONS)


def connect() -> None:
    signals.task_rejected.connect(_on_rejected, weak=False)
    signals.task_unknown.connect(_on_unknown, weak=False)
