"""A producer subscribes to a task's result channel only when it waits for the result."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery.result import AsyncResult

from tests import worker_tasks
from tests.infra import WorkerProcess, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def results_redis(result_backend: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(result_backend)
    yield client
    client.close()


def _subscribes(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_subscribe", {}).get("calls", 0))


def _result_channels(client: redis.Redis) -> int:
    return len(client.pubsub_channels("celery-task-meta-*"))


def test_delay_subscribes_to_nothing_and_subscriptions_do_not_grow(
    worker: WorkerProcess, results_redis: redis.Redis
) -> None:
    before = _subscribes(results_redis)
    # Kept referenced, as a web app holding the AsyncResults would: Celery's own backend keeps
    # one subscription per result until it is read or collected.
    sent = [worker_tasks.add.delay(i, 1) for i in range(50)]
    assert _subscribes(results_redis) == before
    assert _result_channels(results_redis) == 0
    assert wait_for(lambda: all(r.ready() for r in sent), timeout=30)
    assert [r.result for r in sent] == [i + 1 for i in range(50)]
    assert _subscribes(results_redis) == before


def test_get_returns_a_result_stored_before_it_was_called(
    worker: WorkerProcess, results_redis: redis.Redis
) -> None:
    result = worker_tasks.add.delay(40, 2)
    assert wait_for(lambda: results_redis.exists(f"celery-task-meta-{result.id}"), timeout=30)
    started = time.monotonic()
    assert result.get(timeout=10) == 42
    assert time.monotonic() - started < 1.0
    assert AsyncResult(result.id).state == "SUCCESS"


def test_get_waits_for_a_result_stored_after_it_was_called(worker: WorkerProcess) -> None:
    result = worker_tasks.record_and_sleep.delay(f"late-{uuid.uuid4()}", 1.0)
    assert result.get(timeout=20) == 1


def test_get_finds_a_result_stored_without_a_message_on_its_channel(
    conveyor_app,  # type: ignore[no-untyped-def]
    results_redis: redis.Redis,
) -> None:
    # The result lands in Redis after get() read the key, but its PUBLISH is never seen (as when
    # it is handled before the SUBSCRIBE): get() must still return it, from the re-read.
    task_id = str(uuid.uuid4())
    meta = {"status": "SUCCESS", "result": 7, "traceback": None, "children": [], "task_id": task_id}

    def store_without_publishing() -> None:
        time.sleep(0.5)
        results_redis.set(f"celery-task-meta-{task_id}", json.dumps(meta), ex=60)

    writer = threading.Thread(target=store_without_publishing)
    writer.start()
    try:
        assert conveyor_app.AsyncResult(task_id).get(timeout=10) == 7
    finally:
        writer.join()
