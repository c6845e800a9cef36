"""Two relays at once: per queue, each connection's tasks reach the broker in commit order,
each committed row exactly once, no rolled-back row at all (read from the queues themselves)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import psycopg
import pytest
from kombu import Connection

from tasks import outbox
from tests.infra import RabbitNode, wait_for
from tests.outbox.conftest import RelayFactory, waiting_rows

pytestmark = pytest.mark.integration

#: Queues no worker of this module consumes, so the messages stay in publish order.
QUEUES = ("batch", "scheduled", "priority")


def drain(broker_url: str, queue: str) -> list[str]:
    """The task ids in `queue`, in the order the broker holds them (removing them)."""
    ids = []
    with Connection(broker_url, connect_timeout=10) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            ids.append(message.headers["id"])
    return ids


def enqueue_mixed(urls: str, rng: random.Random, rounds: int) -> tuple[dict[Any, list[str]], set]:
    """Transactions of 1-4 rows on two connections, interleaved, a tenth rolled back.

    Returns the committed ids per (connection, queue) in commit order, and the rolled-back ids.
    """
    from tests.worker_tasks import add

    committed: dict[Any, list[str]] = defaultdict(list)
    rolled_back: set[str] = set()
    connections = [psycopg.connect(urls) for _ in range(2)]
    pending: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
    try:
        for _ in range(rounds):
            which = rng.randrange(2)
            db = connections[which]
            for _ in range(rng.randint(1, 4)):
                queue = rng.choice(QUEUES)
                pending[which].append((queue, outbox.apply_async(db, add, [1, 2], queue=queue)))
            if rng.random() < 0.5:
                continue  # this transaction stays open while the other connection commits
            if rng.random() < 0.1:
                db.rollback()
                rolled_back.update(task_id for _, task_id in pending[which])
            else:
                db.commit()
                for queue, task_id in pending[which]:
                    committed[which, queue].append(task_id)
            pending[which] = []
        for which, db in enumerate(connections):
            db.commit()
            for queue, task_id in pending[which]:
                committed[which, queue].append(task_id)
    finally:
        for db in connections:
            db.close()
    return committed, rolled_back


def test_two_relays_publish_each_row_once_in_commit_order_per_queue(
    conveyor_app: Any,
    rabbit: RabbitNode,
    broker_url: str,
    outbox_db: str,
    start_relay: RelayFactory,
) -> None:
    with Connection(broker_url, connect_timeout=10) as connection:
        for queue in QUEUES:
            conveyor_app.amqp.queues[queue](connection.default_channel).declare()
            connection.default_channel.queue_purge(queue)
    start_relay(broker_url, name="relay-1", CONVEYOR_OUTBOX_BATCH_SIZE="20")
    start_relay(broker_url, name="relay-2", CONVEYOR_OUTBOX_BATCH_SIZE="20")

    committed, rolled_back = enqueue_mixed(outbox_db, random.Random(17), rounds=600)
    wait_for(lambda: waiting_rows(outbox_db) == 0, 60, what="the relays to publish every row")

    published = {queue: drain(broker_url, queue) for queue in QUEUES}
    every_published = [task_id for ids in published.values() for task_id in ids]
    every_committed = {task_id for ids in committed.values() for task_id in ids}
    assert len(every_published) == len(set(every_published)), "a row was published twice"
    assert set(every_published) == every_committed
    assert not rolled_back & set(every_published)
    for (which, queue), ids in committed.items():
        mine = set(ids)
        assert [i for i in published[queue] if i in mine] == ids, f"connection {which}, {queue}"
