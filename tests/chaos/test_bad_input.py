"""Bad inputs B1-B10 of RELIABILITY.md, published raw to the task queue, bypassing the client.

For each: the worker stays up and keeps working, nothing is unpickled, the rejection is logged
with its reason and counted (`inspect conveyor_rejections`), and it lands in the dead-letter
queue where the broker allows it.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import signals
from kombu import Connection, Producer
from prometheus_client import CollectorRegistry

from monitoring.exporter.events import TaskEvents
from tasks.base import ArgumentsTooLarge
from tasks.deadletter import store
from tests import worker_tasks
from tests.chaos.conftest import CHAOS_MAX_MESSAGE_BYTES
from tests.infra import ChaosRabbitNode, WorkerProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

DLQ = "conveyor.dead_letter"


@pytest.fixture(scope="module")
def bad_input_worker(
    tmp_path_factory: pytest.TempPathFactory,
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    result_backend: str,
    ledger_url: str,
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        broker_url=chaos_rabbit.url,
        result_backend=result_backend,
        workdir=tmp_path_factory.mktemp("bad-input"),
        name="bad-input",
        concurrency=1,
        env={"CONVEYOR_TEST_LEDGER_URL": ledger_url},
    ).start(timeout=90)
    yield worker
    worker.stop()


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(ledger_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def task_headers(name: str, task_id: str, **overrides: Any) -> dict[str, Any]:
    """Protocol-2 headers, as Celery's client would send them."""
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "shadow": None,
        "eta": None,
        "expires": None,
        "retries": 0,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "raw-test",
        "ignore_result": False,
    }
    headers.update(overrides)
    return headers


def task_body(args: list[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs or {}, embed]).encode()


def publish_raw(
    rabbit: ChaosRabbitNode,
    body: bytes,
    *,
    headers: dict[str, Any] | None,
    content_type: str | None = "application/json",
    content_encoding: str | None = "utf-8",
    routing_key: str = "default",
    correlation_id: str | None = None,
) -> None:
    properties: dict[str, Any] = {}
    if correlation_id:
        properties["correlation_id"] = correlation_id
    with Connection(rabbit.url, transport_options={"confirm_publish": True}) as connection:
        producer = Producer(connection.channel())
        producer.publish(
            body,
            exchange="conveyor",
            routing_key=routing_key,
            headers=headers or {},
            content_type=content_type,
            content_encoding=content_encoding,
            serializer=None,
            delivery_mode=2,
            **properties,
        )


def rejections(app: Any, worker: WorkerProcess) -> dict[str, int]:
    """The worker's rejection counters (its control queue may need a moment after startup)."""

    def ask() -> Any:
        return app.control.broadcast(
            "conveyor_rejections", destination=[worker.node], reply=True, timeout=2
        )

    replies = wait_for(ask, 20, 0.5, "the worker to answer conveyor_rejections")
    return dict(replies[0][worker.node])


@dataclass(frozen=True)
class Before:
    """The worker's rejection counters and the end of its log, before a test publishes."""

    counts: dict[str, int]
    log_offset: int


def before(app: Any, worker: WorkerProcess) -> Before:
    return Before(rejections(app, worker), len(worker.log()))


def dead_letter(rabbit: ChaosRabbitNode, entry_id: str, timeout: float = 20) -> store.Entry:
    def find() -> store.Entry | None:
        with Connection(rabbit.url) as connection:
            return store.find(connection, DLQ, entry_id)

    entry: store.Entry = wait_for(find, timeout, 0.5, f"{entry_id} in the dead-letter queue")
    return entry


def still_works(worker: WorkerProcess) -> None:
    """The worker process is alive and still runs ordinary tasks."""
    assert worker.process is not None and worker.process.poll() is None
    assert worker_tasks.add.delay(2, 3).get(timeout=20) == 5


def rejected(
    app: Any, worker: WorkerProcess, since: Before, reason: str, timeout: float = 20
) -> str:
    """Wait until the worker counted one more `reason` rejection and logged it after `since`;
    return the log line."""
    wait_for(
        lambda: rejections(app, worker).get(reason, 0) > since.counts.get(reason, 0),
        timeout,
        0.5,
        f"a {reason} rejection to be counted",
    )
    lines = [
        line
        for line in worker.log()[since.log_offset :].splitlines()
        if f"message rejected reason={reason} " in line
    ]
    assert lines, f"no {reason} rejection logged after the publish"
    return lines[-1]


@contextmanager
def task_publishes() -> Iterator[list[str]]:
    """Ids of the tasks the client hands to the broker inside the block.

    Celery sends before_task_publish right before the broker publish of every task message, so
    a call that raised before it published nothing.
    """
    seen: list[str] = []

    def record(headers: dict[str, Any] | None = None, **_: Any) -> None:
        seen.append(str((headers or {}).get("id")))

    signals.before_task_publish.connect(record, weak=False)
    try:
        yield seen
    finally:
        signals.before_task_publish.disconnect(record)


def test_b1_a_truncated_json_body_is_dead_lettered_not_dropped(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    since = before(chaos_app, bad_input_worker)
    task_id = str(uuid.uuid4())
    publish_raw(chaos_rabbit, task_body([1, 2])[:-7], headers=task_headers("tests.add", task_id))
    rejected(chaos_app, bad_input_worker, since, "undecodable")
    entry = dead_letter(chaos_rabbit, task_id)
    assert entry.reason == "undecodable"
    assert entry.queue == "default"
    still_works(bad_input_worker)


def test_b2_an_unknown_task_name_is_dead_lettered_and_recorded_as_failed(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    since = before(chaos_app, bad_input_worker)
    task_id = str(uuid.uuid4())
    publish_raw(chaos_rabbit, task_body([]), headers=task_headers("nobody.knows", task_id))
    rejected(chaos_app, bad_input_worker, since, "unknown_task")
    assert dead_letter(chaos_rabbit, task_id).task == "nobody.knows"
    assert chaos_app.AsyncResult(task_id).state == "FAILURE"
    still_works(bad_input_worker)


@pytest.mark.parametrize(
    ("content_type", "body", "reason", "dead_letter_reason"),
    [
        # Celery refuses the text/plain content type before it looks for a task header
        ("text/plain", b"hello, is this the queue?", "content_disallowed", "content_disallowed"),
        # Accepted JSON that is not a task: no task header, and no protocol-1 "task" key
        ("application/json", b'{"order": 7, "status": "paid"}', "not_a_task", "malformed"),
    ],
    ids=["text", "json"],
)
def test_b3_a_plain_message_without_celery_headers_is_dead_lettered(
    content_type: str,
    body: bytes,
    reason: str,
    dead_letter_reason: str,
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    bad_input_worker: WorkerProcess,
) -> None:
    since = before(chaos_app, bad_input_worker)
    marker = str(uuid.uuid4())
    publish_raw(chaos_rabbit, body, headers=None, content_type=content_type, correlation_id=marker)
    rejected(chaos_app, bad_input_worker, since, reason)
    assert dead_letter(chaos_rabbit, marker).reason == dead_letter_reason
    still_works(bad_input_worker)


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the file appearing would mean code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_b4_a_pickle_payload_is_refused_and_never_unpickled(
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    bad_input_worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    sentinel = tmp_path / "pickle-ran"
    payload = pickle.dumps(((_CreatesFile(sentinel),), {}, {}))
    since = before(chaos_app, bad_input_worker)
    task_id = str(uuid.uuid4())
    publish_raw(
        chaos_rabbit,
        payload,
        headers=task_headers("tests.add", task_id),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    rejected(chaos_app, bad_input_worker, since, "content_disallowed")
    dead_letter(chaos_rabbit, task_id)
    assert not sentinel.exists()
    still_works(bad_input_worker)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-yaml", b"- [1, 2]\n- {}\n- {}\n"),
        ("application/x-msgpack", b"\x93\x92\x01\x02\x80\x80"),
        ("text/plain", b"[[1, 2], {}, {}]"),
        (None, b"[[1, 2], {}, {}]"),
    ],
    ids=["yaml", "msgpack", "text", "no-content-type"],
)
def test_b5_other_content_types_are_refused_without_a_crash(
    content_type: str | None,
    body: bytes,
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    bad_input_worker: WorkerProcess,
) -> None:
    total = sum(rejections(chaos_app, bad_input_worker).values())
    task_id = str(uuid.uuid4())
    publish_raw(
        chaos_rabbit,
        body,
        headers=task_headers("tests.add", task_id),
        content_type=content_type,
        content_encoding="binary" if content_type else None,
    )
    wait_for(
        lambda: sum(rejections(chaos_app, bad_input_worker).values()) > total,
        20,
        0.5,
        f"the {content_type} message to be rejected",
    )
    dead_letter(chaos_rabbit, task_id)
    still_works(bad_input_worker)


def test_b6_oversized_arguments_are_refused_at_the_producer_and_the_broker(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    # At the producer: a clear error, nothing published
    with task_publishes() as published:
        with pytest.raises(ArgumentsTooLarge, match="limit is 1000000"):
            worker_tasks.typed.delay("x" * 2_000_000)
        assert published == []
        # (the hook sees a publish that does happen)
        allowed = worker_tasks.typed.delay(1)
        assert published == [allowed.id]
    assert allowed.get(timeout=20) == 2
    # Past the client, the broker's max_message_size refuses the publish itself
    huge = task_body(["x" * (CHAOS_MAX_MESSAGE_BYTES + 1024)])
    with pytest.raises(Exception, match=r"(?i)max|size|PRECONDITION"):
        publish_raw(chaos_rabbit, huge, headers=task_headers("tests.typed", str(uuid.uuid4())))
    still_works(bad_input_worker)


def test_b7_wrong_arguments_through_the_client_fail_at_the_call_and_publish_nothing(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    from tasks import webhooks

    with task_publishes() as published:
        with pytest.raises(TypeError):
            worker_tasks.add.delay(1)
        with pytest.raises(TypeError):
            worker_tasks.add.delay(1, 2, z=3)
        with pytest.raises(ValueError, match="absolute http"):
            webhooks.enqueue("not a url", "order.paid", {})
        assert published == []
        # (the hook sees a publish that does happen)
        allowed = worker_tasks.add.delay(1, 2)
        assert published == [allowed.id]
    assert allowed.get(timeout=20) == 3


def test_b8_wrong_argument_types_fail_once_without_a_redelivery_loop(
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    bad_input_worker: WorkerProcess,
    ledger: redis.Redis,
) -> None:
    task_id = str(uuid.uuid4())
    publish_raw(chaos_rabbit, task_body(["seven"]), headers=task_headers("tests.typed", task_id))
    wait_for(lambda: chaos_app.AsyncResult(task_id).state == "FAILURE", 20, 0.5, "the failure")
    time.sleep(2)
    assert ledger.hget("runs", task_id) == "1"
    wait_for(lambda: chaos_rabbit.message_counts()["default"] == 0, 10, 0.5, "the ack")
    still_works(bad_input_worker)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        # Celery's own Request raises InvalidTaskError for these, and rejects the message
        ({"eta": "not-a-date"}, "invalid_task"),
        ({"expires": "tomorrow-ish"}, "invalid_task"),
        # workers/bad_input.py refuses these before Celery sees them (some used to wedge it)
        ({"retries": "many"}, "malformed"),
        ({"timelimit": "forever"}, "malformed"),
        ({"id": None}, "malformed"),
    ],
    ids=["eta", "expires", "retries", "timelimit", "no-id"],
)
def test_b9_bad_protocol_fields_are_dead_lettered_with_a_log_line_and_the_worker_lives(
    overrides: dict[str, Any],
    reason: str,
    chaos_app: Any,
    chaos_rabbit: ChaosRabbitNode,
    bad_input_worker: WorkerProcess,
    ledger: redis.Redis,
) -> None:
    since = before(chaos_app, bad_input_worker)
    task_id = str(uuid.uuid4())
    headers = task_headers("tests.typed", task_id, **overrides)
    publish_raw(chaos_rabbit, task_body([1]), headers=headers, correlation_id=task_id)
    line = rejected(chaos_app, bad_input_worker, since, reason)
    assert f"id={headers['id']} " in line
    # The dead letter is found by its id, or by its correlation id when it has none
    assert dead_letter(chaos_rabbit, task_id).reason == "malformed"
    assert ledger.hget("runs", task_id) is None
    still_works(bad_input_worker)


def test_b10_hostile_json_is_dead_lettered_and_memory_stays_bounded(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    since = before(chaos_app, bad_input_worker)
    # Very deep nesting: the decoder's recursion limit, not the worker, gives up
    deep_id = str(uuid.uuid4())
    deep = b"[" * 200_000 + b"]" * 200_000
    publish_raw(chaos_rabbit, deep, headers=task_headers("tests.add", deep_id))
    rejected(chaos_app, bad_input_worker, since, "undecodable")
    dead_letter(chaos_rabbit, deep_id)
    # A huge string just under the broker's limit: fails as a task, once
    huge_id = str(uuid.uuid4())
    huge = task_body(["y" * (CHAOS_MAX_MESSAGE_BYTES - 4096)])
    publish_raw(chaos_rabbit, huge, headers=task_headers("tests.typed", huge_id))
    wait_for(lambda: chaos_app.AsyncResult(huge_id).state == "FAILURE", 30, 0.5, "the failure")
    still_works(bad_input_worker)
    assert bad_input_worker.process is not None
    tree = psutil.Process(bad_input_worker.process.pid)
    rss = sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])
    assert rss < 600 * 1024 * 1024, f"worker tree uses {rss / 2**20:.0f} MiB"


def test_an_unroutable_publish_is_kept_in_the_unroutable_queue(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    before = chaos_rabbit.message_counts().get("conveyor.unroutable", 0)
    publish_raw(
        chaos_rabbit,
        task_body([1, 2]),
        headers=task_headers("tests.add", str(uuid.uuid4())),
        routing_key="no-such-queue",
    )
    wait_for(
        lambda: chaos_rabbit.message_counts().get("conveyor.unroutable", 0) == before + 1,
        10,
        0.5,
        "the unroutable message to be kept",
    )


def test_rejections_reach_the_exporter_as_a_counter_by_reason(
    chaos_app: Any, chaos_rabbit: ChaosRabbitNode, bad_input_worker: WorkerProcess
) -> None:
    # The exporter's own event consumer, on the chaos node
    registry = CollectorRegistry()
    events = TaskEvents(registry)
    stop = threading.Event()
    consumer = threading.Thread(target=events.consume_forever, args=(chaos_app, stop), daemon=True)
    consumer.start()

    def count(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0

    try:
        # Once a task's success arrives, the consumer is bound and sees what follows
        def sees_events() -> bool:
            worker_tasks.add.delay(1, 1).get(timeout=20)
            return count("conveyor_tasks_succeeded_total", task="tests.add") > 0

        wait_for(sees_events, 30, 0.5, "the exporter to receive events")
        publish_raw(
            chaos_rabbit, task_body([1])[:-3], headers=task_headers("tests.add", str(uuid.uuid4()))
        )
        publish_raw(chaos_rabbit, b'{"not": "a task"}', headers=None)
        for reason in ("undecodable", "not_a_task"):
            wait_for(
                lambda r=reason: (
                    count("conveyor_messages_rejected_total", reason=r, queue="default") == 1
                ),
                20,
                0.5,
                f"the exporter to count the {reason} rejection",
            )
    finally:
        stop.set()
        consumer.join(10)
