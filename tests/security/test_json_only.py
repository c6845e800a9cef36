"""Pickle is refused everywhere a message is decoded: tasks, results and events."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from kombu import Connection, Exchange, Producer
from kombu.exceptions import ContentDisallowed, DecodeError

from tests.infra import ROOT, RabbitNode, WorkerProcess, wait_for

pytestmark = pytest.mark.integration


class CreatesFile:
    """Unpickling this object creates the file: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_pickled_task_is_refused_dead_lettered_and_never_unpickled(
    worker: WorkerProcess, rabbit: RabbitNode, broker_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    # Given a hostile publisher that bypasses the client and sends a pickle body
    with Connection(broker_url) as connection:
        Producer(connection).publish(
            pickle.dumps(CreatesFile(marker)),
            exchange=Exchange("conveyor", type="topic"),
            routing_key="default",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={
                "task": "tests.add",
                "id": task_id,
                "lang": "py",
                "argsrepr": "",
                "kwargsrepr": "",
            },
            serializer=None,
        )

    # Then the message ends in the dead-letter queue, refused, and nothing was unpickled
    wait_for(
        lambda: rabbit.queues()["conveyor.dead_letter"]["messages"] >= 1,
        30,
        what="the refused message to be dead-lettered",
    )
    assert not marker.exists()
    assert "ContentDisallowed" in worker.log() or "disallowed" in worker.log().lower()
    # And the worker keeps working
    from tests.worker_tasks import add

    assert add.delay(1, 2).get(timeout=20) == 3


def test_a_pickled_result_is_refused_when_read(
    conveyor_app, result_backend: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import redis

    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    # Given someone with write access to Redis planting a pickled result
    meta = {"status": "SUCCESS", "result": CreatesFile(marker), "task_id": task_id}
    redis.Redis.from_url(result_backend).set(f"celery-task-meta-{task_id}", pickle.dumps(meta))

    # Then reading it fails (the Redis backend decodes stored results as JSON only), and
    # nothing was unpickled
    with pytest.raises((ContentDisallowed, DecodeError)):
        AsyncResult(task_id, app=conveyor_app).get(timeout=5)
    assert not marker.exists()


#: An event monitor (as Flower runs one), in its own process: says "ready" once its queue is
#: bound, and stops at the JSON sentinel event (or after 30 s).
MONITOR = """
import sys, threading
from tasks import app
sentinel = sys.argv[1]
seen = []
def handle(event):
    seen.append(event)
    if event.get("sentinel") == sentinel:
        recv.should_stop = True
with app.connection_for_read() as conn:
    recv = app.events.Receiver(conn, handlers={"*": handle})
    ready = recv.on_consume_ready
    def on_consume_ready(*args, **kwargs):
        ready(*args, **kwargs)
        print("ready", flush=True)
    recv.on_consume_ready = on_consume_ready
    threading.Timer(30, setattr, (recv, "should_stop", True)).start()
    try:
        recv.capture()
    except Exception as exc:
        print("error", type(exc).__name__)
print("hostile", sum("hostile" in event for event in seen))
print("sentinel", sum(event.get("sentinel") == sentinel for event in seen))
"""


def test_a_pickled_event_is_refused_by_event_consumers(
    conveyor_app, broker_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "unpickled"
    sentinel = str(uuid.uuid4())
    # Given an event monitor that has bound its queue to the event exchange
    env = {**os.environ, "CELERY_BROKER_URL": broker_url}
    process = subprocess.Popen(
        [sys.executable, "-c", MONITOR, sentinel],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", process.communicate(timeout=30)
    # When a pickled event is published on the event exchange, then a JSON one
    with Connection(broker_url) as connection:
        producer = Producer(connection, exchange=Exchange("celeryev", type="topic"))
        producer.publish(
            pickle.dumps({"type": "task-succeeded", "hostile": CreatesFile(marker)}),
            routing_key="task.succeeded",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            serializer=None,
        )
        producer.publish(
            {"type": "task-succeeded", "sentinel": sentinel, "hostname": "x", "clock": 1},
            routing_key="task.succeeded",
            serializer="json",
        )
    out, err = process.communicate(timeout=60)
    # Then the monitor was listening (it saw the JSON event, after the pickled one) and never
    # unpickled the pickled one, nor stopped on it
    assert not marker.exists()
    assert "sentinel 1" in out, out + err
    assert "hostile 0" in out, out + err
    assert "error" not in out, out + err
