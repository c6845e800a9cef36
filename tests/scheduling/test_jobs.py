"""The shipped periodic jobs, run by a real worker against the private broker and Redis."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from kombu import Exchange, Producer

from tasks.schedule import jobs
from tasks.schedule.reports import report_key
from tests.infra import WorkerProcess

pytestmark = pytest.mark.integration


def test_queue_health_counts_messages_waiting_in_the_dead_letter_queue(
    sched_worker: WorkerProcess, conveyor_app: Any, result_backend: str
) -> None:
    conveyor_app.conf.redbeat_redis_url = result_backend
    dead_letter = conveyor_app.conf.conveyor_dead_letter_queue
    before = jobs.check_queue_health.delay().get(timeout=30)["dead_letters"]

    # Given two messages dead-lettered (published straight to the dead-letter exchange)
    marker = uuid.uuid4().hex
    exchange = Exchange(conveyor_app.conf.conveyor_dead_letter_exchange, type="topic")
    with conveyor_app.connection_for_write() as connection:
        producer = Producer(connection.channel(), exchange=exchange)
        for _ in range(2):
            producer.publish({"marker": marker}, routing_key="default", serializer="json")

        # When the queue-health job runs, then it records them
        snapshot = jobs.check_queue_health.delay().get(timeout=30)
        assert snapshot["dead_letters"] == before + 2
        assert snapshot["queues"]["default"]["consumers"] >= 1
        assert snapshot["queues"][dead_letter]["messages"] == before + 2

        # (take our two back out, leaving the queue as it was: other tests' dead letters, task
        # messages among them, stay unacked on this channel until it closes, which returns
        # them; rejecting each one with requeue would only get it back at the next basic_get)
        channel = connection.channel()
        taken = 0
        try:
            while taken < 2:
                message = channel.basic_get(dead_letter)
                assert message is not None
                # (any body, str or bytes as py-amqp decoded it: other tests dead-letter task
                # messages and malformed ones)
                body = message.body
                if marker in (body if isinstance(body, str) else body.decode("latin-1")):
                    channel.basic_ack(message.delivery_tag)
                    taken += 1
        finally:
            channel.close()


def test_the_daily_report_counts_the_days_tasks_by_name_and_state(
    sched_worker: WorkerProcess, conveyor_app: Any, result_backend: str
) -> None:
    from tests import worker_tasks

    conveyor_app.conf.redbeat_redis_url = result_backend
    for n in range(3):
        worker_tasks.add.delay(n, n).get(timeout=30)
    today = datetime.now(UTC).astimezone(conveyor_app.timezone).date()

    report = jobs.daily_report.delay(today.isoformat()).get(timeout=60)

    assert report["day"] == today.isoformat()
    assert report["by_task"]["tests.add"]["SUCCESS"] >= 3
    stored = redis.Redis.from_url(result_backend).get(report_key(today))
    assert stored is not None and json.loads(stored)["total"] == report["total"]


def test_the_cleanup_job_gives_result_keys_without_a_ttl_the_configured_expiry(
    sched_worker: WorkerProcess, conveyor_app: Any, result_backend: str
) -> None:
    conveyor_app.conf.redbeat_redis_url = result_backend
    client = redis.Redis.from_url(result_backend)
    key = f"celery-task-meta-{uuid.uuid4()}"
    client.set(key, json.dumps({"status": "SUCCESS", "result": 1}))
    assert client.ttl(key) == -1

    # Each run scans a budget of keys and resumes where the last one stopped, so with the keys
    # earlier tests left in this Redis the new one may only come up a few runs later.
    fixed = 0
    for _ in range(50):
        done = jobs.cleanup_expired_data.delay().get(timeout=60)
        assert done["results-without-expiry"] >= 0, done
        fixed += done["results-without-expiry"]
        if client.ttl(key) != -1:
            break

    assert fixed >= 1
    assert 0 < client.ttl(key) <= conveyor_app.conf.result_expires
