"""The last successful run of every schedule entry, recorded by the worker that ran it.

A task that carries beat's entry header (see entries.py) and succeeds writes the time into one
Redis hash; monitoring/schedule.py reads it with the entries' intervals for the exporter and
`celery -A tasks overview`, which is what the "schedule missed" alert
(deploy/prometheus/alerts.yml) compares.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, signals

from core.redis import client as redis_client
from tasks.schedule import overlap
from tasks.schedule.entries import ENTRY_HEADER

#: Hash: entry name -> Unix time of its last successful run.
LAST_SUCCESS_KEY = "conveyor:schedule:last_success"


def _on_success(sender: Any = None, **_: Any) -> None:
    entry = overlap.header(sender.request, ENTRY_HEADER) if sender is not None else None
    if entry:
        redis = redis_client(sender.app.conf.redbeat_redis_url)
        redis.hset(LAST_SUCCESS_KEY, str(entry), time.time())


def read(app: Celery) -> dict[str, float]:
    """Unix time of each entry's last successful run, by entry name."""
    recorded = redis_client(app.conf.redbeat_redis_url).hgetall(LAST_SUCCESS_KEY)
    return {str(name): float(at) for name, at in recorded.items()}


def connect() -> None:
    """Record successful runs (tasks/schedule/hooks.py)."""
    signals.task_success.connect(_on_success, weak=False)
