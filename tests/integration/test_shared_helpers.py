"""core's shared helpers against the real private nodes: one Redis client per process (a
forked child gets its own pool), queue depth by passive declare, one time format."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import pytest
from kombu import Connection

from core import amqp, clock
from core import redis as core_redis

pytestmark = pytest.mark.integration


def test_a_process_reuses_its_client_and_a_forked_child_builds_its_own(redis_url: str) -> None:
    parent = core_redis.client(f"{redis_url}/5")
    parent.set("helper:parent", "1")
    assert core_redis.client(f"{redis_url}/5") is parent
    assert core_redis.client(f"{redis_url}/5", decode_responses=False) is not parent

    child = os.fork()
    if child == 0:  # the child: its own client, whose pool works; never back into pytest
        ok = False
        try:
            mine = core_redis.client(f"{redis_url}/5")
            ok = mine is not parent and mine.connection_pool is not parent.connection_pool
            ok = ok and mine.get("helper:parent") == "1"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert parent.get("helper:parent") == "1"  # the parent's pool was left alone


def test_passive_declares_give_each_queue_depth_and_none_for_a_missing_one(
    broker_url: str,
) -> None:
    with Connection(broker_url) as connection:
        channel: Any = connection.channel()
        channel.queue_declare(queue="helper-depth", auto_delete=False)
        producer = connection.Producer()
        for body in ("x", "y"):
            producer.publish(body, exchange="", routing_key="helper-depth")

        def depths() -> dict[str, amqp.Depth | None]:
            return amqp.passive_depths(connection, ["no-such-queue", "helper-depth"])

        try:
            found = depths()
            for _ in range(50):  # publishes without confirms: give the broker a moment
                if found["helper-depth"] == amqp.Depth(2, 0):
                    break
                found = depths()
        finally:
            channel.queue_delete(queue="helper-depth")
            channel.close()

    assert list(found) == ["no-such-queue", "helper-depth"]
    assert found == {"no-such-queue": None, "helper-depth": amqp.Depth(2, 0)}


def test_times_are_written_as_iso_8601_from_datetimes_and_epoch_seconds() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)
    assert clock.iso(moment) == "2026-01-02T03:04:05.678+00:00"
    assert clock.iso(moment, timespec="seconds") == "2026-01-02T03:04:05+00:00"
    assert clock.iso(str(moment.timestamp())) == "2026-01-02T03:04:05.678+00:00"
    assert clock.iso(None) is None
