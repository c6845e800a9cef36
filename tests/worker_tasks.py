"""Tasks that only the test suite uses. The test worker loads them with --include."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from tasks.celery_app import app


def _ledger() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"], decode_responses=True)


@app.task(name="tests.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.ran_at")
def ran_at() -> float:
    """The wall-clock time at which the task started."""
    return time.time()


@app.task(name="tests.record_and_sleep", bind=True)
def record_and_sleep(self: Any, key: str, seconds: float) -> int:
    """Count this execution and publish the pool process's pid, then sleep; returns the count."""
    ledger = _ledger()
    runs = int(ledger.incr(f"runs:{key}"))
    ledger.set(f"pid:{key}:{runs}", os.getpid())
    time.sleep(seconds)
    return runs
