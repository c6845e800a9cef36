"""Worker-side records of the chaos ledger that the tasks themselves do not keep.

Loaded by the chaos workers with --include (tests/chaos/conftest.py). For every task that
returns, the pool process appends "<started> <finished>" (wall-clock seconds) to the ledger's
`completions` list: `harness.check` reads from it how soon after each heal the worker consumed
and finished a task again (promise 5, recovery).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import signals

_started: dict[str, float] = {}
_client: redis.Redis | None = None


def _ledger() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"])
    return _client


@signals.task_prerun.connect
def _note_start(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _started[task_id] = time.time()


@signals.task_postrun.connect
def _record_completion(task_id: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id or "", None)
    if started is None or "CONVEYOR_TEST_LEDGER_URL" not in os.environ:
        return
    _ledger().rpush("completions", f"{started:.3f} {time.time():.3f}")
