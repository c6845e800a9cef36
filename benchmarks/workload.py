"""The work every system does, so that the systems differ only in their machinery."""

from __future__ import annotations

import os
import time

import redis

#: Redis list where each system's task pushes its enqueue-to-start latency (seconds).
LATENCY_KEY = "bench:latency"

_client: redis.Redis | None = None


def record_latency(sent: float) -> None:
    """Called first thing in the task body: the latency is enqueue -> start."""
    started = time.time()
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    _client.rpush(LATENCY_KEY, started - sent)
