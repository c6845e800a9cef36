"""Batch handlers and a callback task that only the tests use (the worker loads them with
--include). They record in the test ledger (a separate Redis database) what really ran."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from tasks.batch import handlers
from tasks.batch.handlers import Aggregate, ItemError, TransientItemError, WriteFiles
from tasks.celery_app import app


def _ledger() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"], decode_responses=True)


def _slowly(options: dict[str, Any], key: str) -> None:
    """Take `delay` seconds, so that a test can act mid-batch; count runs if asked to."""
    time.sleep(float(options.get("delay", 0.002)))
    if options.get("count_runs"):
        _ledger().incr(f"runs:{key}")


@handlers.register("tests.slow_aggregate")
class SlowAggregate(Aggregate):
    def process(self, item: Any, key: str) -> Any:
        _slowly(self.options, key)
        return super().process(item, key)


@handlers.register("tests.slow_write_files")
class SlowWriteFiles(WriteFiles):
    def process(self, item: Any, key: str) -> Any:
        _slowly(self.options, key)
        return super().process(item, key)


@handlers.register("tests.flaky_aggregate")
class FlakyAggregate(Aggregate):
    """Aggregate whose first try of every item with a value ending in 3 fails transiently."""

    def process(self, item: Any, key: str) -> Any:
        if str(item.get("value", "")).endswith("3") and _ledger().incr(f"tries:{key}") == 1:
            raise TransientItemError("the service was briefly away")
        return super().process(item, key)


@handlers.register("tests.fail_until_fixed")
class FailUntilFixed(Aggregate):
    """Aggregate that rejects items with a value ending in 0 until the ledger says `fixed`."""

    def process(self, item: Any, key: str) -> Any:
        if str(item.get("value", "")).endswith("0") and not _ledger().exists("fixed"):
            raise ItemError("downstream rejected the item")
        return super().process(item, key)


@app.task(name="tests.batch_done")
def batch_done(batch_id: str) -> int:
    """A user's completion callback: counts its own runs per batch."""
    return int(_ledger().incr(f"callback:{batch_id}"))
