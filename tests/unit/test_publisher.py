"""Chunk messages are published with pipelined confirms, against a real (private) RabbitMQ."""

from __future__ import annotations

from typing import Any

import pytest

from core.publisher import ConfirmedPublisher
from tests import worker_tasks

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
