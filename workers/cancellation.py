"""Cancelling a delayed job before it runs, durably.

Celery's own ``revoke`` lives in each worker's memory: a worker that starts after the revoke
(restart, scale-up) runs the job anyway, unless every worker keeps a ``--statedb`` file. A
delayed job waits in the broker, so it usually reaches a worker that never saw the revoke.

Conveyor records the cancellation in Redis (``conveyor:cancelled:<task id>``, with a TTL)
and broadcasts Celery's revoke for workers already holding the message. When a worker
receives a message that carries an ETA (every countdown/eta job does), it looks the id up;
a cancelled job is added to the worker's revoked set, so Celery discards it the standard way:
state REVOKED in the result backend, a task-revoked event, the message acked.

If Redis cannot be reached, the check logs an error and lets the job run: failing a
worker's consumer on a Redis outage would stop every queue, not one job.

So that ``schedule cancel`` can answer "not found" for an id that names no delayed job, every
process that publishes one records its id (``conveyor:delayed:<task id>``) until an hour past
its due time. The record is best-effort: a publish never fails for it.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery, current_app, signals
from celery.worker import state as worker_state

from core.redis import client as redis_client

logger = logging.getLogger(__name__)

#: Seconds a cancellation is kept by default: longer than any delay Conveyor expects.
DEFAULT_KEEP_SECONDS = 30 * 86_400
#: Seconds a delayed job's record outlives its due time: it may wait in its queue a while.
DELAYED_RECORD_MARGIN = 3600


#: Seconds a Redis call may take here: it runs on the consumer's thread, before any task of
#: the message, so it must not hold the worker up for long.
_TIMEOUT = 2.0


#: Shorter still for the record of a delayed publish: it runs in the publisher's call, whose
#: time is bounded and documented.
_RECORD_TIMEOUT = 0.5


def cancellation_key(task_id: str) -> str:
    return f"conveyor:cancelled:{task_id}"


def cancel(app: Celery, task_id: str, *, keep_seconds: int = DEFAULT_KEEP_SECONDS) -> None:
    """Cancel a delayed job by id; it is discarded when due, whichever worker receives it.

    keep_seconds must outlast the job's remaining delay.
    """
    redis_client(app.conf.redbeat_redis_url, timeout=_TIMEOUT).set(
        cancellation_key(task_id), "1", ex=keep_seconds
    )
    app.control.revoke(task_id)


def delayed_key(task_id: str) -> str:
    return f"conveyor:delayed:{task_id}"


def is_delayed(app: Celery, task_id: str) -> bool:
    """Whether a delayed job with this id was published and is not long past due."""
    return bool(
        redis_client(app.conf.redbeat_redis_url, timeout=_TIMEOUT).exists(delayed_key(task_id))
    )


def _on_published(sender: Any = None, headers: Any = None, **_: Any) -> None:
    eta = (headers or {}).get("eta")
    if not eta:
        return
    due = datetime.fromisoformat(eta)
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    remaining = max(0, math.ceil((due - datetime.now(UTC)).total_seconds()))
    try:
        client = redis_client(current_app.conf.redbeat_redis_url, timeout=_RECORD_TIMEOUT)
        client.set(delayed_key(headers["id"]), "1", ex=remaining + DELAYED_RECORD_MARGIN)
    except redis.exceptions.RedisError as exc:
        logger.warning("cannot record delayed task %s for cancellation: %r", headers["id"], exc)


def is_cancelled(app: Celery, task_id: str) -> bool:
    return bool(
        redis_client(app.conf.redbeat_redis_url, timeout=_TIMEOUT).exists(cancellation_key(task_id))
    )


def _on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None or not request.eta:
        return
    try:
        cancelled = is_cancelled(request.task.app, request.id)
    except redis.exceptions.RedisError as exc:
        logger.error("cannot check cancellation of task %s, running it: %r", request.id, exc)
        return
    if cancelled:
        logger.info("task %s[%s] was cancelled; discarding it", request.name, request.id)
        worker_state.revoked.add(request.id)


def connect() -> None:
    signals.task_received.connect(_on_task_received, weak=False)
    signals.after_task_publish.connect(_on_published, weak=False)
