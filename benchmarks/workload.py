"""The work every system does, so that the systems differ only in their machinery."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

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


#: Distinct keys in `records`: enough groups that aggregating is real work, few enough that a
#: chunk's partial stays small.
RECORD_KEYS = 64
_KEYS = [f"k{n}" for n in range(RECORD_KEYS)]
#: Amounts cycle with a period prime to RECORD_KEYS, so every key sees many of them.
_AMOUNTS = [f"{((n * 7_919) % 1_000_003 - 200_000) / 100:.2f}" for n in range(10_007)]


def records(count: int) -> Iterator[dict[str, str]]:
    """`count` records like CSV rows: a key and a two-decimal amount, reproducibly.

    The batch benchmark's "small real per-item workload": the `aggregate` handler parses the
    amount (exact decimal) and folds it into its key's count, sum, min and max. The strings are
    made once, so that making the items costs the producer (and the ceiling) little.
    """
    for n in range(count):
        yield {"key": _KEYS[n % RECORD_KEYS], "value": _AMOUNTS[n % 10_007]}
