"""Chunk messages are published with pipelined confirms, against a real (private) RabbitMQ."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest

from core.publisher import BrokerError, ConfirmedPublisher, route
from tests import worker_tasks
from tests.infra import RabbitNode, require

pytestmark = pytest.mark.integration


def test_many_messages_are_in_flight_at_once_and_all_are_confirmed(conveyor_app: Any) -> None:
    # Given a publisher that may have up to 50 messages unconfirmed
    in_flight: list[int] = []
    with ConfirmedPublisher(conveyor_app, max_unconfirmed=50, timeout=20) as publisher:
        for n in range(300):
            publisher.send(worker_tasks.add, [n, n], f"pipelined-{n}", argsrepr="(n, n)")
            in_flight.append(len(publisher._unconfirmed))
    # Then publishing did not wait for each confirm in turn, never exceeded the bound ...
    assert max(in_flight) > 1
    assert max(in_flight) <= 50
    # ... and closing waited for every confirm (task-sent events take delivery tags too)
    assert publisher.published >= 300
    assert publisher._unconfirmed == set()


def test_the_first_message_to_each_queue_declares_it(conveyor_app: Any) -> None:
    # Given a queue that does not exist yet (declare on publish, as the default)
    with conveyor_app.connection_for_write() as connection:
        connection.default_channel.queue_delete("priority")
    # When one publisher sends to another queue first, then to that one
    with ConfirmedPublisher(conveyor_app, timeout=20) as publisher:
        publisher.send(worker_tasks.add, [1, 1], "declare-batch", "(1, 1)", queue="batch")
        publisher.send(worker_tasks.add, [2, 2], "declare-priority", "(2, 2)", queue="priority")
    # Then the second queue was declared before its first message, which is there
    with conveyor_app.connection_for_write() as connection:
        channel = connection.default_channel
        assert channel.queue_declare("priority", passive=True).message_count == 1
        channel.queue_purge("priority")
        channel.queue_purge("batch")


def test_a_routed_message_is_the_message_apply_async_sends(conveyor_app: Any) -> None:
    from core.publisher import route

    # Given the same task and arguments, published once through apply_async and once along
    # the task's worked-out route (as the outbox relay does), to a queue nobody consumes
    routed = route(conveyor_app, worker_tasks.add, "priority")
    assert routed is not None
    with ConfirmedPublisher(conveyor_app, timeout=20) as publisher:
        publisher.send(
            worker_tasks.add,
            [1, 2],
            "full-path",
            "[1, 2]",
            queue="priority",
            ignore_result=bool(worker_tasks.add.ignore_result),
        )
        publisher.send_routed(routed, "routed-path", [1, 2], {}, "[1, 2]", "{}")
    with conveyor_app.connection_for_write() as connection:
        channel = connection.default_channel
        full = channel.basic_get("priority", no_ack=True)
        fast = channel.basic_get("priority", no_ack=True)
        assert channel.basic_get("priority", no_ack=True) is None
    # Then a worker gets the same message from both, apart from the task id
    assert full.headers["id"] == "full-path"
    assert fast.headers["id"] == "routed-path"
    per_task = {"id", "root_id"}
    assert {k: v for k, v in fast.headers.items() if k not in per_task} == {
        k: v for k, v in full.headers.items() if k not in per_task
    }
    # (a top-level task is its own root in both)
    assert (full.headers["root_id"], fast.headers["root_id"]) in {
        ("full-path", "routed-path"),
        (None, None),
    }
    assert fast.body == full.body
    for name in ("content_type", "content_encoding", "delivery_mode", "priority", "reply_to"):
        assert fast.properties.get(name) == full.properties.get(name), name
    assert fast.properties["correlation_id"] == "routed-path"
    assert fast.delivery_info["exchange"] == full.delivery_info["exchange"]
    assert fast.delivery_info["routing_key"] == full.delivery_info["routing_key"]


def test_a_task_whose_options_change_per_call_has_no_fixed_route(conveyor_app: Any) -> None:
    from core.publisher import route

    @conveyor_app.task(name="tests.expiring", expires=60, shared=False)
    def expiring() -> None: ...

    assert route(conveyor_app, expiring, "default") is None
    assert route(conveyor_app, worker_tasks.add, "default") is not None


def test_a_routed_publish_declares_nothing_when_declaring_on_publish_is_off(
    conveyor_app: Any,
) -> None:
    from amqp.exceptions import NotFound

    from core.publisher import route

    # Given the producer role's setting (it may not declare) and a queue that does not exist
    routed = route(conveyor_app, worker_tasks.add, "priority")
    assert routed is not None
    with conveyor_app.connection_for_write() as connection:
        connection.default_channel.queue_delete("priority")
    conveyor_app.conf.conveyor_declare_on_publish = False
    try:
        # When a routed message is published
        with ConfirmedPublisher(conveyor_app, timeout=20) as publisher:
            publisher.send_routed(routed, "undeclared", [1, 1], {}, "[1, 1]", "{}")
    finally:
        conveyor_app.conf.conveyor_declare_on_publish = True
    # Then the queue was not declared for it (the message went to the unroutable exchange)
    with conveyor_app.connection_for_write() as connection, pytest.raises(NotFound):
        connection.default_channel.queue_declare("priority", passive=True)
    with conveyor_app.connection_for_write() as connection:
        conveyor_app.amqp.queues["priority"](connection.default_channel).declare()


def test_sends_leave_in_full_segments_and_a_broker_that_stops_reading_fails_the_write(
    conveyor_app: Any, rabbit: RabbitNode, broker_url: str
) -> None:
    require(broker_url == rabbit.url, "needs the suite's private node (CELERY_BROKER_URL is set)")
    routed = route(conveyor_app, worker_tasks.add, "priority")  # a queue nobody consumes
    assert routed is not None
    timeout = conveyor_app.conf.conveyor_publish_timeout
    conveyor_app.conf.conveyor_publish_timeout = 2.0
    try:
        publisher = ConfirmedPublisher(conveyor_app, timeout=20)
    finally:
        conveyor_app.conf.conveyor_publish_timeout = timeout
    sock = publisher._socket
    try:
        # Given a publisher: its socket's writes are bounded by conveyor_publish_timeout
        seconds, microseconds = struct.unpack(
            "ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)
        )
        assert seconds + microseconds / 1e6 == pytest.approx(2.0)
        # When it sends the first message to a queue, which declares the queue (a round trip),
        # the socket is not corked: the declare would wait for the kernel's 200 ms
        publisher.send_routed(routed, "declaring", [1, 1], {}, "[1, 1]", "{}")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        # When it sends the next, the kernel holds the message for a full segment (Linux) ...
        publisher.send_routed(routed, "corked", [1, 1], {}, "[1, 1]", "{}")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
        # ... and waiting for the confirm sends it first, so the confirm comes
        publisher.wait(0)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        assert publisher._unconfirmed == set()

        # When the broker stops reading (a memory alarm blocks every publisher) while
        # messages far larger than the socket buffers are sent
        rabbit.set_memory_watermark(0)
        big = "x" * 1_000_000
        started = time.monotonic()
        try:
            with pytest.raises(BrokerError) as refused:
                for n in range(200):
                    publisher.send_routed(routed, f"blocked-{n}", [big], {}, "[big]", "{}")
        finally:
            rabbit.set_memory_watermark(0.4)
        # Then a socket write failed within the bound, as a typed broker error (not the
        # 20 s confirm timeout, and not a publish blocked until the alarm clears)
        assert "basic_publish: timed out" in str(refused.value), refused.value
        assert time.monotonic() - started < 15
    finally:
        publisher.connection.release()
    with conveyor_app.connection_for_write() as connection:
        connection.default_channel.queue_purge("priority")
