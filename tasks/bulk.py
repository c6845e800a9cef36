"""Enqueue many tasks in one go, with pipelined publisher confirms.

``delay()`` waits for the broker's confirm of each message before it returns: right for one
call from a web request, a round trip per task for a loop of ten thousand. ``enqueue_many``
sends them back to back on one confirmed channel and collects the broker's confirms as they
come (at most ``max_unconfirmed`` outstanding), so it costs about what raw AMQP costs. It
returns once every message is confirmed.

If it raises (the broker refused a message, a confirm did not come within ``timeout``, the
connection died), the tasks before the last ``max_unconfirmed`` are in the queue and the rest
may or may not be: publish the unconfirmed ones again with the same ids (``ids`` of the
exception) and make the task idempotent (``run_once``), as for any indeterminate publish.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from celery.utils import uuid
from kombu.exceptions import OperationalError

from core.publisher import ConfirmedPublisher, route, typed_broker_errors
from tasks.base import check_publishable


class BulkEnqueueError(Exception):
    """A bulk enqueue failed; `ids` lists every task id it published or tried to."""

    def __init__(self, message: str, ids: list[str]) -> None:
        super().__init__(message)
        self.ids = ids


class BulkPublishError(BulkEnqueueError, OperationalError):
    """The broker failed during a bulk enqueue: also a kombu OperationalError, as every broker
    failure at publish is."""


def enqueue_many(
    task: Any,
    calls: Iterable[Sequence[Any]],
    *,
    max_unconfirmed: int | None = None,
    timeout: float | None = None,
    **options: Any,
) -> list[str]:
    """Publish `task` once per argument tuple in `calls`; returns the task ids, in order.

    Arguments are checked against the task's signature and size limit as ``delay()`` checks
    them: a bad call is not published, and stops the enqueue with a BulkEnqueueError whose
    cause is the ValueError (tasks.base.check_publishable). A broker failure raises
    BulkPublishError, which is also kombu's OperationalError. `options` (queue, countdown,
    priority...) apply to every message.
    """
    ids: list[str] = []
    publisher = _open_publisher(task, ids, max_unconfirmed, timeout)
    refused: Exception | None = None
    try:
        refused = _publish_calls(publisher, task, calls, ids, options)
        # Even when a call was refused: what went out before it is confirmed before we say so.
        publisher.wait(0)
    except Exception as exc:
        failure = BulkPublishError if isinstance(exc, OperationalError) else BulkEnqueueError
        raise failure(f"bulk enqueue of {task.name} failed: {exc}", ids) from exc
    finally:
        publisher.connection.release()
    if refused is not None:
        raise BulkEnqueueError(
            f"call {len(ids)} of {task.name} refused, not published: {refused}", ids
        ) from refused
    return ids


def _open_publisher(
    task: Any, ids: list[str], max_unconfirmed: int | None, timeout: float | None
) -> ConfirmedPublisher:
    conf = task.app.conf
    try:
        with typed_broker_errors():
            return ConfirmedPublisher(
                task.app,
                max_unconfirmed=max_unconfirmed or int(conf.conveyor_bulk_max_unconfirmed),
                timeout=timeout or float(conf.conveyor_publish_timeout),
            )
    except OperationalError as exc:
        raise BulkPublishError(f"bulk enqueue of {task.name} failed: {exc}", ids) from exc


def _publish_calls(
    publisher: ConfirmedPublisher,
    task: Any,
    calls: Iterable[Sequence[Any]],
    ids: list[str],
    options: dict[str, Any],
) -> Exception | None:
    """Publish each call, adding its id to `ids`; returns the error of a refused call, if any.

    Without options beyond a queue, and outside a running task, every message goes along the
    task's route, worked out once (core.publisher.route: the message apply_async would send,
    without its per-call work). Other options (countdown, priority...) take the full
    apply_async path per call, and so does a call from inside a task, whose messages carry
    their parent's ids (send_task reads them from the running task).
    """
    routed = None
    if set(options) <= {"queue"} and task.app.current_worker_task is None:
        routed = route(task.app, task, options.get("queue"))
    for args in calls:
        task_id = uuid()
        ids.append(task_id)
        arguments, shown = list(args), repr(tuple(args))
        try:
            if routed is not None:
                check_publishable(task, arguments, {})
                publisher.send_routed(routed, task_id, arguments, {}, shown, "{}")
                continue
            publisher.send(
                task,
                arguments,
                task_id,
                shown,
                ignore_result=bool(task.ignore_result),
                **options,
            )
        except (TypeError, ValueError) as exc:
            return exc
    return None
