"""Queue health: each queue's depth and consumers, and the dead-letter count, kept in Redis.

A passive queue_declare returns a queue's message and consumer counts over AMQP itself, so
this needs no management plugin. The latest snapshot is ``conveyor:queue_health:latest``
(JSON); a history list ``conveyor:queue_health:history`` keeps one a minute for a day.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, astuple, dataclass
from typing import Any

import redis
from celery import Celery
from celery.utils.log import get_task_logger

from core.amqp import passive_depths
from core.redis import client as redis_client

logger = get_task_logger(__name__)

LATEST_KEY = "conveyor:queue_health:latest"
HISTORY_KEY = "conveyor:queue_health:history"


def schedule_redis(app: Celery) -> redis.Redis:
    """The Redis that holds the schedule and the scheduled jobs' own records."""
    return redis_client(app.conf.redbeat_redis_url)


@dataclass(frozen=True)
class QueueDepth:
    name: str
    messages: int | None  # None: the queue does not exist
    consumers: int | None


def measure(app: Celery) -> list[QueueDepth]:
    """Depth and consumers of every task queue and of the dead-letter queue."""
    names = [queue.name for queue in app.conf.task_queues]
    names.append(app.conf.conveyor_dead_letter_queue)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)
        found = passive_depths(connection, names)
    return [
        QueueDepth(name, None, None) if depth is None else QueueDepth(name, *astuple(depth))
        for name, depth in found.items()
    ]


def record(app: Celery, depths: list[QueueDepth], now: float | None = None) -> dict[str, Any]:
    """Store a snapshot and warn about dead letters and missing queues."""
    dead_letter = app.conf.conveyor_dead_letter_queue
    snapshot = {
        "at": now if now is not None else time.time(),
        "queues": {d.name: asdict(d) for d in depths},
        "dead_letters": next((d.messages for d in depths if d.name == dead_letter), None),
    }
    client = schedule_redis(app)
    body = json.dumps(snapshot)
    with client.pipeline() as pipe:
        pipe.set(LATEST_KEY, body)
        pipe.lpush(HISTORY_KEY, body)
        pipe.execute()
    missing = [d.name for d in depths if d.messages is None]
    if missing:
        logger.warning("queue health: missing queues %s", ", ".join(missing))
    if snapshot["dead_letters"]:
        logger.warning("queue health: %s messages in %s", snapshot["dead_letters"], dead_letter)
    return snapshot


def latest(app: Celery) -> dict[str, Any] | None:
    raw = schedule_redis(app).get(LATEST_KEY)
    return dict(json.loads(raw)) if raw else None
