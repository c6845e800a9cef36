"""Tasks that only the test suite uses. The test worker loads them with --include."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import signals

from tasks.celery_app import app


def _ledger() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CONVEYOR_TEST_LEDGER_URL"], decode_responses=True)


def _count_run(request: Any, ledger: redis.Redis | None = None) -> int:
    """Count one execution of the task id in the chaos ledger's `runs`; returns the count.

    A delivery the broker flagged as redelivered (its copy went back to the queue at a crash
    or connection loss) is also counted in `redelivered`: the harness bounds those, and tells
    them apart from a second publish of the id that no ledger saw (a publish retried inside
    kombu after its confirm was lost arrives unflagged).
    """
    with (ledger or _ledger()).pipeline(transaction=False) as pipe:
        pipe.hincrby("runs", request.id, 1)
        if (request.delivery_info or {}).get("redelivered"):
            pipe.hincrby("redelivered", request.id, 1)
        return int(pipe.execute()[0])


@signals.task_retry.connect
def _count_retry_publish(request: Any = None, **_: Any) -> None:
    """Record that a task published its own retry: that run is a publish, not a redelivery.

    Celery sends task_retry only after the retry message was published. An idempotent task
    whose redelivered copy finds the first copy still holding the lease retries
    (EffectInProgress), so one fault can give such an id a redelivered run and a retry run.
    """
    if request is not None and "CONVEYOR_TEST_LEDGER_URL" in os.environ:
        _ledger().hincrby("retried", request.id, 1)


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


@app.task(name="tests.chaos_work", bind=True)
def chaos_work(self: Any, seconds: float) -> str:
    """Count this execution of the task id in the chaos ledger, then work for `seconds`."""
    _count_run(self.request)
    time.sleep(seconds)
    return str(self.request.id)


@app.task(name="tests.timed_work", bind=True)
def timed_work(self: Any) -> None:
    """Count this execution in the chaos ledger and log when it started (failover gaps)."""
    _count_run(self.request)
    _ledger().rpush("starts", time.time())


@app.task(name="tests.poison")
def poison() -> None:
    """Kill the pool process that runs it, as a task that always runs out of memory would."""
    _ledger().incr("poison:runs")
    os._exit(137)


@app.task(name="tests.long_running", bind=True)
def long_running(self: Any, seconds: float) -> float:
    """Sleep past the broker's consumer_timeout unless the time limit stops it first."""
    _count_run(self.request)
    time.sleep(seconds)
    return seconds


@app.task(name="tests.typed", bind=True)
def typed(self: Any, count: int) -> int:
    """Fails (TypeError) when a raw message gives `count` the wrong type."""
    _count_run(self.request)
    return count + 1


@app.task(name="tests.idempotent_effect", bind=True)
def idempotent_effect(self: Any, key: str, seconds: float) -> int:
    """Count the execution, work, then apply an effect (a counter per key) at most once.

    The counter lives in the idempotency database (the chaos workers point
    CONVEYOR_IDEMPOTENCY_URL at the ledger), so it commits with its done-marker.
    """
    _count_run(self.request)
    time.sleep(seconds)
    outcome = self.run_once_in_redis(key, lambda pipe: pipe.hincrby("effects", key, 1), lease=3)
    return int(outcome.value[0]) if outcome.value else 0


@app.task(name="tests.transient", bind=True, max_retries=2)
def transient(self: Any, key: str) -> str:
    """Raises ConnectionError while the ledger has `broken:<key>`: retried, then dead-lettered."""
    ledger = _ledger()
    _count_run(self.request, ledger)
    if ledger.exists(f"broken:{key}"):
        raise ConnectionError(f"{key} is down")
    return "ok"


@app.task(name="tests.held_effect", bind=True)
def held_effect(self: Any, key: str, hold: float) -> int:
    """An effect (a counter per key) at most once, under the configured (default) lease.

    The first run holds the lease for `hold` seconds before committing, time for a test to
    kill it there. Every run records the transient-retry count it was given.
    """
    ledger = _ledger()
    runs = _count_run(self.request, ledger)
    ledger.rpush(f"retries:{self.request.id}", self.request.retries)

    def effect(pipe: Any) -> None:
        if runs == 1:
            ledger.set(f"holding:{key}", os.getpid())
            time.sleep(hold)
        pipe.hincrby("effects", key, 1)

    outcome = self.run_once_in_redis(key, effect)
    return int(outcome.value[0]) if outcome.value else 0
