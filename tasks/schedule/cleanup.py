"""Expired-data cleanup: a registry of cleaners that the hourly cleanup job runs in turn.

A cleaner is a function ``(app, budget) -> int`` (keys handled) decorated with
``@cleaner("name")``; this module registers the two below. State that Redis expires by itself
(batches, idempotency keys) needs none. Each cleaner gets a budget of keys per run, so one run
stays short however much there is to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.utils.log import get_task_logger

logger = get_task_logger(__name__)

Cleaner = Callable[[Celery, int], int]
CLEANERS: dict[str, Cleaner] = {}

#: Keys each cleaner may touch per run.
DEFAULT_BUDGET = 10_000
#: Result-backend key patterns that Celery always writes with an expiry.
RESULT_PATTERNS = ("celery-task-meta-*", "celery-taskset-meta-*", "chord-unlock-*")
#: Where each result pattern's SCAN cursor is kept between runs.
CURSOR_PREFIX = "conveyor:cleanup:cursor:"
#: Queue-health snapshots kept (one a minute: one day).
HEALTH_HISTORY = 1440


def cleaner(name: str) -> Callable[[Cleaner], Cleaner]:
    """Register a cleaner under `name` (replacing any of the same name)."""

    def register(function: Cleaner) -> Cleaner:
        CLEANERS[name] = function
        return function

    return register


@cleaner("results-without-expiry")
def expire_results_without_ttl(app: Celery, budget: int) -> int:
    """Give result keys that have no TTL (written under another result_expires) the current one.

    Redis drops expired results by itself; what piles up is keys that never got a TTL. Each
    run resumes the SCAN where the previous one stopped, so a budget smaller than the key
    count still covers every key over successive runs.
    """
    backend: Any = app.backend
    client = backend.client
    ttl = app.conf.result_expires
    seconds = int(ttl.total_seconds() if hasattr(ttl, "total_seconds") else ttl or 0)
    if seconds <= 0:
        return 0  # results are meant to be kept: nothing is expired
    fixed = 0
    per_pattern = max(1, budget // len(RESULT_PATTERNS))
    for pattern in RESULT_PATTERNS:
        cursor_key = f"{CURSOR_PREFIX}{pattern}"
        cursor = int(client.get(cursor_key) or 0)
        seen = 0
        while seen < per_pattern:
            cursor, keys = client.scan(cursor=cursor, match=pattern, count=500)
            seen += len(keys)
            for key in keys:
                if client.ttl(key) == -1:
                    client.expire(key, seconds)
                    fixed += 1
            if cursor == 0:
                break
        client.set(cursor_key, cursor)
    return fixed


@cleaner("queue-health-history")
def trim_queue_health_history(app: Celery, budget: int) -> int:
    """Keep the last day of queue-health snapshots."""
    from tasks.schedule.queue_health import HISTORY_KEY, schedule_redis

    client = schedule_redis(app)
    before = int(client.llen(HISTORY_KEY))
    client.ltrim(HISTORY_KEY, 0, HEALTH_HISTORY - 1)
    return max(0, before - HEALTH_HISTORY)


def run_cleaners(app: Celery, budget: int = DEFAULT_BUDGET) -> dict[str, int]:
    """Run every cleaner; one failing does not stop the others (its count is -1)."""
    done: dict[str, int] = {}
    for name, function in sorted(CLEANERS.items()):
        try:
            done[name] = function(app, budget)
        except Exception:
            logger.exception("cleaner %s failed", name)
            done[name] = -1
    return done
