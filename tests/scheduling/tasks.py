"""Tasks the scheduling tests' worker runs (loaded with --include); they write a ledger."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from tasks.celery_app import app
from tasks.schedule.entries import SLOT_HEADER
from tasks.schedule.overlap import header


def _ledger() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"], decode_responses=True)


def _record(self: Any, key: str, event: str) -> None:
    slot = header(self.request, SLOT_HEADER)
    ledger = _ledger()
    row = {"at": time.time(), "slot": slot, "id": self.request.id, "event": event}
    with ledger.pipeline() as pipe:
        pipe.rpush(f"runs:{key}", json.dumps(row))
        if event == "start" and slot:
            pipe.hincrby(f"slots:{key}", slot, 1)
        pipe.execute()


@app.task(name="tests.sched.record", bind=True)
def record(self: Any, key: str) -> None:
    """One execution: its time, its task id and the slot beat fired it for."""
    _record(self, key, "start")


@app.task(name="tests.sched.record_and_sleep", bind=True)
def record_and_sleep(self: Any, key: str, seconds: float) -> None:
    """Records its start and end around a sleep: long enough to still run at the next slot."""
    _record(self, key, "start")
    time.sleep(seconds)
    _record(self, key, "end")
