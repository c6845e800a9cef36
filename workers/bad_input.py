"""Bad input is dead-lettered with its reason, logged and counted, never silently dropped.

Celery acks and drops a message whose body cannot be decoded (truncated JSON, bad compression,
hostile nesting): Consumer.on_decode_error logs it and calls ``message.ack()``. Celery rejects
without requeue a message with no task header, an unknown task name, a refused content type
(such as pickle) or malformed protocol fields, and a task that raised Reject. This consumer
step makes each of them a dead letter that says why: the worker publishes a confirmed copy
with Conveyor's reason headers to the dead-letter exchange and acks the original
(workers/dead_letter.py), where `celery -A tasks dlq` shows it. The reasons are
``content_disallowed``, ``undecodable``, ``malformed`` and ``unknown_task`` for bad input, and
``retries_exhausted`` for a task that raised core.dead_letters.RetriesExhausted.

Every rejection writes one line ``message rejected reason=<reason> total=<n>``, the totals
per reason answer ``celery -A tasks inspect conveyor_rejections``, and a ``conveyor-rejected``
event (reason, queue: the queue it was consumed from) goes out with the task events, which the
exporter counts as ``conveyor_messages_rejected_total`` (monitoring/exporter/). The counted
reasons are finer than the dead-letter ones: ``not_a_task`` and ``invalid_task`` are both
dead-lettered as ``malformed``.

The step also declares the alternate exchange of the task exchange and its queue, so a message
published to ``conveyor`` with a routing key that matches no queue is kept, not dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from celery import bootsteps, signals
from celery.worker.control import inspect_command
from kombu import Exchange, Queue

from core.dead_letters import RETRIES_EXHAUSTED, RetriesExhausted
from workers.dead_letter import Why, dead_letter, queue_of

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
#: Task id -> why, for tasks whose retries ran out, until their message is rejected (which
#: Celery does right after the task_failure signal that fills it).
_exhausted: dict[str, Why] = {}
#: Exception name given for a refused message that raised none (no task header, bad fields).
INVALID_TASK = "InvalidTaskError"


def count_rejection(reason: str, message: Any, detail: object = "") -> int:
    """Count one rejected message and log it with its reason; returns the new total."""
    with _lock:
        REJECTIONS[reason] += 1
        total = REJECTIONS[reason]
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    body = getattr(message, "body", b"") or b""
    _send_event(reason, queue_of(_consumer, message))
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
    """Replacement for Consumer.on_decode_error: dead-letter instead of ack (drop)."""
    reason = "content_disallowed" if type(exc).__name__ == "ContentDisallowed" else "undecodable"
    count_rejection(reason, message, f"{type(exc).__name__}: {exc}")
    dead_letter(_consumer, message, Why(reason, type(exc).__name__, str(exc)))


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
                dead_letter(c, message, Why("malformed", INVALID_TASK, problem))
                return None
            # Celery rejects through this method (bad input, a task's Reject): see _on_reject.
            message.reject_log_error = partial(_on_reject, message)
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                count_rejection("malformed", message, f"{type(exc).__name__}: {exc}")
                if not message.acknowledged:
                    dead_letter(c, message, Why("malformed", type(exc).__name__, str(exc)))
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
        global _consumer
        super().__init__(c, **kwargs)
        _consumer = c
        # Set before the Tasks step builds the task consumer, which reads these attributes.
        c.on_decode_error = dead_letter_undecodable
        c.on_unknown_message = explained(c.on_unknown_message, _not_a_task)
        c.on_unknown_task = explained(c.on_unknown_task, _unknown_task)
        c.on_invalid_task = explained(c.on_invalid_task, _invalid_task)
        guard_task_handler(c)

    def start(self, c: Any) -> None:
        _, queue = unroutable_entities(c.app.conf)
        with c.connection.channel() as channel:
            queue.bind(channel).declare()


def _on_reject(message: Any, log: Any, errors: Any, requeue: bool = False) -> None:
    """Message.reject_log_error for task messages: dead-letter with the reason when it is known.

    Celery rejects a message itself, then sends the signal that says why (task_rejected,
    task_unknown), so the reason is attached to the message before (`explained`); for a task
    whose retries ran out it comes from the task_failure signal (`_on_failure`).
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    why = message.__dict__.pop("conveyor_why", None) or _exhausted.pop(str(headers.get("id")), None)
    if requeue or why is None:
        type(message).reject_log_error(message, log, errors, requeue)
        return
    try:
        dead_letter(_consumer, message, why)
    except errors as exc:
        log.critical("couldn't dead-letter message: %r", exc, exc_info=True)


def explained(handler: Callable[..., Any], why: Callable[..., Why]) -> Callable[..., Any]:
    """Wrap one of Celery's bad-message handlers so that its reject carries `why`."""

    def explained_handler(body: Any, message: Any, *args: Any) -> Any:
        message.conveyor_why = why(message, *args)
        return handler(body, message, *args)

    return explained_handler


def _not_a_task(message: Any) -> Why:
    return Why("malformed", INVALID_TASK, "no Celery task header")


def _unknown_task(message: Any, exc: Any = None) -> Why:
    name = message.headers.get("task") if isinstance(message.headers, dict) else None
    return Why("unknown_task", "NotRegistered", f"no task named {name!r} is registered")


def _invalid_task(message: Any, exc: Any = None) -> Why:
    name = type(exc).__name__
    return Why("content_disallowed" if name == "ContentDisallowed" else "malformed", name, str(exc))


def _on_failure(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    """Remember why a task that ran out of retries is about to be rejected."""
    if isinstance(exception, RetriesExhausted):
        if len(_exhausted) >= 10_000:  # rejected by a path that never asked: don't grow
            _exhausted.clear()
        cause: Any = getattr(exception, "reason", None)
        _exhausted[str(task_id)] = Why(RETRIES_EXHAUSTED, type(cause).__name__, str(cause))


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
    signals.task_failure.connect(_on_failure, weak=False)
