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
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery, signals
from celery.worker import state as worker_state

from core.redis import client as redis_client

logger = logging.getLogger(__name__)

#: Seconds a cancellation is kept by default: longer than any delay Conveyor expects.
DEFAULT_KEEP_SECONDS = 30 * 86_400


#: Seconds a Redis call may take here: it runs on the consumer's thread, before any task of
#: the message, so it must not hold the worker up for long.
_TIMEOUT = 2.0


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
