"""Monitoring events skip publisher confirms, task messages keep them, and monitors see all."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import OperationalError

from core.events import sent_event_dispatcher, sent_events
from tests import worker_tasks
from tests.chaos.conftest import pointed_at
from tests.infra import ChaosRabbitNode, WorkerProcess, wait_for

pytestmark = pytest.mark.integration

TASK_EVENTS = ("task-sent", "task-received", "task-started", "task-succeeded")


@pytest.fixture
def monitor(conveyor_app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Every event on the broker's event exchange, captured as Flower and the exporter do."""
    with capture_events(conveyor_app) as seen:
        yield seen


@contextmanager
def capture_events(conveyor_app: Celery) -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    with conveyor_app.connection_for_read() as connection:
        receiver = conveyor_app.events.Receiver(
            connection, handlers={"*": seen.append}, app=conveyor_app
        )
        receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        assert ready.wait(20), "the event receiver never started"
        yield seen
        receiver.should_stop = True
        thread.join(10)


def test_a_monitor_sees_every_event_of_a_task(
    worker: WorkerProcess, monitor: list[dict[str, Any]]
) -> None:
    # When a task is delayed and runs
    result = worker_tasks.add.delay(1, 2)
    assert result.get(timeout=20) == 3

    # Then its four events reach the monitor, task-sent with the task's name and queue
    def kinds() -> set[str]:
        return {e["type"] for e in monitor if e.get("uuid") == result.id}

    wait_for(lambda: kinds() >= set(TASK_EVENTS), 20, what=f"all of {TASK_EVENTS}")
    sent = next(e for e in monitor if e["type"] == "task-sent" and e["uuid"] == result.id)
    assert sent["name"] == "tests.add"
    assert sent["queue"] == "default"


def test_task_publishes_are_confirmed_and_task_sent_events_are_not(
    worker: WorkerProcess, conveyor_app: Celery
) -> None:
    # Given a task sent, which opens both the task's and the event's channel
    worker_tasks.add.delay(2, 2).get(timeout=20)

    # Then the task's channel waits for confirms, and the event's channel never asked for them
    with conveyor_app.producer_or_acquire() as producer:
        assert producer.channel.basic_publish == producer.channel.basic_publish_confirm
    events = sent_event_dispatcher(conveyor_app).producer.channel
    assert events.basic_publish != events.basic_publish_confirm
    assert events._confirm_selected is False


def test_a_bulk_enqueue_sends_every_task_sent_event_in_lists(
    worker: WorkerProcess, monitor: list[dict[str, Any]]
) -> None:
    from tasks.bulk import enqueue_many

    # When 250 tasks go out in one bulk enqueue (lists of conveyor_sent_event_batch = 100)
    ids = enqueue_many(worker_tasks.add, ((n, 1) for n in range(250)))

    # Then the monitor sees one task-sent event per task, with its name and queue
    def sent() -> dict[str, dict[str, Any]]:
        return {e["uuid"]: e for e in list(monitor) if e["type"] == "task-sent"}

    wait_for(lambda: set(ids) <= set(sent()), 30, what="a task-sent event for every task")
    assert {(e["name"], e["queue"]) for i, e in sent().items() if i in ids} == {
        ("tests.add", "default")
    }


def test_a_lone_task_sent_event_goes_out_within_the_flush_interval(
    conveyor_app: Celery, monitor: list[dict[str, Any]]
) -> None:
    # Given no worker: only the producer's event can arrive
    # When a single task is sent, far fewer than a list's worth of events
    sent_at = time.monotonic()
    task_id = worker_tasks.add.delay(5, 5).id

    # Then its buffered task-sent event is published by the background flush, not held back
    # until a list's worth is waiting
    wait_for(
        lambda: any(e["type"] == "task-sent" and e["uuid"] == task_id for e in list(monitor)),
        5,
        what="the task-sent event",
    )
    assert time.monotonic() - sent_at < 2.0
    conveyor_app.control.purge()


def test_task_sent_events_resume_after_the_broker_restarts(
    conveyor_app: Celery, tmp_path: Path
) -> None:
    # Given a producer sending to a node of its own, which then restarts
    node = ChaosRabbitNode(tmp_path / "rabbit").start()
    try:
        with pointed_at(conveyor_app, node.url):
            worker_tasks.add.delay(1, 1)
            sent_events(conveyor_app).flush()
            node.stop_app()
            node.start_app()
            # As any producer would, retry until a publish goes through on a new connection.
            wait_for(lambda: published(worker_tasks.add), 60, what="a publish after the restart")

            # When a task is sent after the restart, with a monitor listening on the new node
            with capture_events(conveyor_app) as monitor:
                task_id = worker_tasks.add.delay(2, 2).id

                # Then its task-sent event reaches the monitor: the event connection recovered
                wait_for(
                    lambda: any(
                        e["type"] == "task-sent" and e["uuid"] == task_id for e in list(monitor)
                    ),
                    10,
                    what="the task-sent event sent after the restart",
                )
    finally:
        node.stop()


def published(task: Any) -> bool:
    try:
        task.delay(0, 0)
    except OperationalError:
        return False
    return True
