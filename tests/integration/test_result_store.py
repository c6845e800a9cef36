"""Storing a task's state: one Redis round trip, Celery's guard and format kept."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.backends.redis import RedisBackend as CeleryRedisBackend

from core.results import RedisBackend

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(conveyor_app: Any) -> RedisBackend:
    backend = conveyor_app.backend
    assert isinstance(backend, RedisBackend)
    return backend


@pytest.fixture
def results_redis(result_backend: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(result_backend)
    yield client
    client.close()


def _calls(client: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in client.info("commandstats").items()}


def test_a_stored_state_reads_back_as_celerys_own_would(
    conveyor_app: Any, backend: RedisBackend, result_backend: str
) -> None:
    stock = CeleryRedisBackend(app=conveyor_app, url=result_backend)
    ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    backend.store_result(ours, {"n": 1}, "SUCCESS")
    stock.store_result(theirs, {"n": 1}, "SUCCESS")
    mine, reference = stock.get_task_meta(ours), stock.get_task_meta(theirs)
    assert mine.pop("task_id") == ours
    assert reference.pop("task_id") == theirs
    assert mine.pop("date_done") and reference.pop("date_done")
    assert mine == reference


def test_one_round_trip_per_state_and_no_separate_get(
    backend: RedisBackend, results_redis: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, "STARTED")  # loads the script once
    before = _calls(results_redis)
    backend.store_result(task_id, 3, "SUCCESS")
    after = _calls(results_redis)
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert changed.pop("cmdstat_info", None) is not None
    # The GET, SET and PUBLISH run inside the one EVALSHA; Celery's path sends a GET, then
    # MULTI, SETEX, PUBLISH and EXEC.
    assert changed == {
        "cmdstat_evalsha": 1,
        "cmdstat_get": 1,
        "cmdstat_set": 1,
        "cmdstat_publish": 1,
    }
    assert backend.get_task_meta(task_id)["result"] == 3


def test_a_later_state_never_overwrites_success(
    backend: RedisBackend, results_redis: redis.Redis
) -> None:
    # As a redelivered copy of a task that already succeeded would try to.
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 1, "SUCCESS")
    backend.store_result(task_id, None, "STARTED")
    backend.store_result(task_id, ValueError("again"), "FAILURE")
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == ("SUCCESS", 1)


def test_states_before_success_are_overwritten_published_and_expire(
    backend: RedisBackend, results_redis: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    listener = results_redis.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(key)
    listener.get_message(timeout=1)
    backend.store_result(task_id, None, "STARTED")
    backend.store_result(task_id, ValueError("boom"), "FAILURE")
    published = [listener.get_message(timeout=2) for _ in range(2)]
    listener.close()
    assert [backend.decode_result(m["data"])["status"] for m in published if m] == [
        "STARTED",
        "FAILURE",
    ]
    assert backend.get_task_meta(task_id)["status"] == "FAILURE"
    assert 0 < results_redis.ttl(key) <= backend.failure_expires
