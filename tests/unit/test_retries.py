"""Transient-error retries of every Conveyor task: which errors, how long apart, how they end."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import amqp.exceptions
import kombu.exceptions
import pytest
import redis.exceptions
from celery import Celery
from celery.exceptions import Reject, Retry

from tasks.base import (
    LEASE_WAIT_JITTER,
    LEASE_WAITS_HEADER,
    TRANSIENT_ERRORS,
    Task,
    lease_wait_countdown,
    lease_waits,
)
from tasks.idempotency import EffectInProgress


@pytest.fixture
def app() -> Iterator[Celery]:
    """Conveyor's settings and Task class, results in memory: nothing here publishes."""
    app = Celery("retries", task_cls=Task, set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.result_backend = "cache+memory://"
    yield app


def failing_task(app: Celery, error: Exception, **options: Any) -> Any:
    @app.task(name=f"unit.failing.{id(error)}", bind=True, **options)
    def failing(self: Any) -> None:
        raise error

    return failing


def countdowns(task: Any, retries: int, samples: int) -> list[float]:
    """The countdowns the task's autoretry asks for after its `retries`-th retry failed."""
    asked: list[float] = []

    def record(**kwargs: Any) -> Retry:
        asked.append(kwargs["countdown"])
        return Retry()

    task.retry = record
    task.push_request(id="t", retries=retries, called_directly=False)
    try:
        for _ in range(samples):
            with pytest.raises(Retry):
                task.run()
    finally:
        task.pop_request()
        del task.retry
    return asked


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("refused"),
        TimeoutError("slow"),
        redis.exceptions.ConnectionError("redis down"),
        redis.exceptions.TimeoutError("redis slow"),
        kombu.exceptions.OperationalError("broker down"),
        amqp.exceptions.ConnectionForced("broker closed the connection"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_connection_errors_and_timeouts_of_every_client_are_retried(
    app: Celery, error: Exception
) -> None:
    assert isinstance(error, TRANSIENT_ERRORS)
    assert countdowns(failing_task(app, error), retries=0, samples=1)


def test_other_errors_are_not_retried(app: Celery) -> None:
    task = failing_task(app, ValueError("bad input"))
    task.push_request(id="t", retries=0, called_directly=False)
    try:
        with pytest.raises(ValueError):
            task.run()
    finally:
        task.pop_request()


def test_retry_countdowns_grow_exponentially_with_full_jitter_up_to_the_cap(app: Celery) -> None:
    task = failing_task(app, redis.exceptions.ConnectionError("down"), max_retries=12)
    for retries in range(task.max_retries):
        ceiling = min(2**retries, task.retry_backoff_max)
        seen = countdowns(task, retries, samples=300)
        # Full jitter: anywhere from 0 to the exponential ceiling, never above it
        assert all(0 <= c <= ceiling for c in seen), (retries, ceiling, sorted(set(seen)))
        if retries >= 2:
            assert len(set(seen)) > 2, f"no jitter after retry {retries}: {set(seen)}"
            assert max(seen) >= 0.7 * ceiling, f"retry {retries} never backs off near {ceiling}"
    # The cap: 2**10 = 1024 s would exceed retry_backoff_max
    assert max(countdowns(task, 10, samples=300)) <= task.retry_backoff_max == 600


def test_the_default_retry_window_is_31_seconds_at_most(app: Celery) -> None:
    task = failing_task(app, ConnectionError("down"))
    worst = sum(min(2**n, task.retry_backoff_max) for n in range(task.max_retries))
    assert (task.max_retries, worst) == (5, 31)
    # ... shorter than the idempotency lease: why a lease is waited out, not retried
    assert worst < app.conf.conveyor_idempotency_lease


def test_after_the_last_retry_the_task_is_dead_lettered_with_its_failure_stored(
    app: Celery,
) -> None:
    task = failing_task(app, redis.exceptions.TimeoutError("still slow"))
    task.push_request(id="exhausted-1", retries=task.max_retries, called_directly=False)
    try:
        with pytest.raises(Reject) as rejected:
            task.run()
    finally:
        task.pop_request()
    assert rejected.value.requeue is False
    assert app.AsyncResult("exhausted-1").state == "FAILURE"
    assert isinstance(app.AsyncResult("exhausted-1").result, redis.exceptions.TimeoutError)


def test_too_many_lease_waits_in_a_row_dead_letter_the_task(app: Celery) -> None:
    task = failing_task(app, EffectInProgress("held", retry_after=30))
    limit = app.conf.conveyor_idempotency_lease_waits
    task.push_request(
        id="waited-1", retries=0, called_directly=False, **{LEASE_WAITS_HEADER: limit}
    )
    try:
        with pytest.raises(Reject):
            task.run()
    finally:
        task.pop_request()
    assert app.AsyncResult("waited-1").state == "FAILURE"


def test_a_lease_wait_lasts_the_leases_remaining_time_plus_a_little_jitter() -> None:
    rng = random.Random(7)
    waits = [lease_wait_countdown(42.5, rng) for _ in range(200)]
    assert all(42.5 <= w <= 42.5 + LEASE_WAIT_JITTER for w in waits)
    assert len(set(waits)) > 1
    assert 0 <= lease_wait_countdown(-1, rng) <= LEASE_WAIT_JITTER


def test_lease_waits_are_read_from_the_message_header() -> None:
    class Request:
        pass

    request = Request()
    assert lease_waits(request) == 0
    setattr(request, LEASE_WAITS_HEADER, 3)
    assert lease_waits(request) == 3
    setattr(request, LEASE_WAITS_HEADER, "junk")
    assert lease_waits(request) == 0
