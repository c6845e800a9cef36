"""The one-task-per-item baseline of benchmarks/batch.py (the benchmark worker includes it)."""

from __future__ import annotations

import os

import redis

from tasks.celery_app import app

_client: redis.Redis | None = None


@app.task(name="bench.count_item", ignore_result=True)
def count_item(run: str, item: int) -> None:
    """A trivial item, done the plain Celery way: one message and one task each."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["CONVEYOR_BENCH_REDIS_URL"])
    _client.incr(f"bench:{run}")
