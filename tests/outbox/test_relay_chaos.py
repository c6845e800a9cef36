"""Relays SIGKILLed at random points under load lose nothing (the chaos ledger's method).

Two relays publish 10,000 tasks enqueued in transactions of 1-20 rows (a tenth rolled back);
one relay or the other is killed three times and started again. Every committed id must run,
no rolled-back id may, the runs beyond the first stay within kills x batch size (the rows a
killed relay had published but not yet marked), and every effect (run_once) happens once.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from kombu import Connection

from tasks import outbox
from tests.chaos.harness import Outcome, count_duplicates
from tests.infra import WorkerProcess, wait_for
from tests.outbox.conftest import RelayFactory, RelayProcess, waiting_rows

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]

#: The issue's size; CONVEYOR_OUTBOX_CHAOS_TASKS makes a quick local run smaller.
TASKS = int(os.environ.get("CONVEYOR_OUTBOX_CHAOS_TASKS", "10000"))
KILLS = 3
BATCH_SIZE = 200
#: Seconds over which the rows are written, so the kills land under load.
SPREAD = 15.0


@dataclass
class Enqueuer:
    """Writes TASKS outbox rows in transactions of 1-20, a tenth rolled back, over SPREAD s."""

    url: str
    rng: random.Random
    committed: dict[str, str | None] = field(default_factory=dict)  # task id -> effect key
    rolled_back: set[str] = field(default_factory=set)

    def run(self) -> None:
        written = 0
        with psycopg.connect(self.url) as db:
            while written < TASKS:
                rows = dict(
                    self.enqueue(db) for _ in range(min(self.rng.randint(1, 20), TASKS - written))
                )
                written += len(rows)
                if self.rng.random() < 0.1:
                    db.rollback()
                    self.rolled_back.update(rows)
                else:
                    db.commit()
                    self.committed.update(rows)
                time.sleep(SPREAD * len(rows) / TASKS)

    def enqueue(self, db: Any) -> tuple[str, str | None]:
        """One row: a tenth are effects (run_once), the rest only count their runs."""
        from tests.worker_tasks import chaos_work, idempotent_effect

        if self.rng.random() < 0.1:
            key = uuid.uuid4().hex
            return outbox.delay(db, idempotent_effect, key, 0), key
        return outbox.delay(db, chaos_work, 0), None


def ready(broker_url: str) -> int:
    """Messages ready in the default queue (a passive declare: no rabbitmqctl VM to start)."""
    with Connection(broker_url, connect_timeout=10) as connection:
        return int(connection.default_channel.queue_declare("default", passive=True).message_count)


def relay_in_transaction(url: str, relays: list[RelayProcess]) -> int:
    """The index of a relay caught inside a batch's transaction (publishing or marking)."""
    pids = {relay.process.pid: n for n, relay in enumerate(relays) if relay.process}

    def busy() -> int | None:
        with psycopg.connect(url, autocommit=True) as db:
            rows = db.execute(
                "SELECT application_name FROM pg_stat_activity WHERE state LIKE 'idle in tr%'"
                " AND application_name LIKE 'conveyor-outbox-relay:%'"
                " AND query LIKE '%SKIP LOCKED%'"
            ).fetchall()
        found = [pids.get(int(name.rsplit(":", 1)[1])) for (name,) in rows]
        return next((n for n in found if n is not None), None)

    return int(wait_for(lambda: (n := busy()) is not None and [n], 30, interval=0.005)[0])


def test_relays_killed_at_random_points_lose_nothing_and_duplicate_within_the_bound(
    conveyor_app: Any,
    broker_url: str,
    result_backend: str,
    ledger_url: str,
    outbox_db: str,
    start_relay: RelayFactory,
    tmp_path: Path,
) -> None:
    ledger = redis.Redis.from_url(ledger_url, decode_responses=True)
    ledger.flushdb()
    worker = WorkerProcess(
        broker_url=broker_url,
        result_backend=result_backend,
        workdir=tmp_path / "worker",
        name="outbox-chaos",
        concurrency=3,
        env={
            "CONVEYOR_TEST_LEDGER_URL": ledger_url,
            "CONVEYOR_IDEMPOTENCY_URL": ledger_url,
            # Drains the 10,000 tasks faster; prefetch changes nothing the relay promises.
            "CELERY_WORKER_PREFETCH_MULTIPLIER": "50",
        },
    ).start(timeout=90)
    size = {"CONVEYOR_OUTBOX_BATCH_SIZE": str(BATCH_SIZE)}
    relays = [start_relay(broker_url, name=f"relay-{n}", **size) for n in (1, 2)]
    rng = random.Random(1717)
    enqueuer = Enqueuer(outbox_db, rng)
    producer = threading.Thread(target=enqueuer.run, daemon=True)
    started = time.monotonic()
    try:
        # When relays are killed at random points while the rows keep coming
        producer.start()
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.2, 1.0))
            victim = relay_in_transaction(outbox_db, relays)
            relays[victim].kill()
            # Started again without waiting for it: the other relay takes the work over.
            relays[victim] = start_relay(
                broker_url, name=f"relay-{victim + 1}-{kill}", wait=False, **size
            )
        producer.join(120)
        assert not producer.is_alive(), "the enqueuer did not finish"

        # Then every committed id runs, and the queue drains
        wait_for(lambda: waiting_rows(outbox_db) == 0, 60, what="every row to be published")
        published = time.monotonic()
        wait_for(
            lambda: ledger.hlen("runs") >= len(enqueuer.committed) and ready(broker_url) == 0,
            # About 20 s alone on the 2-core VM; a machine shared with other test runs is slower.
            600,
            interval=0.5,
            what=f"every committed task to run ({len(enqueuer.committed)})",
        )
        time.sleep(2)  # a duplicate still being executed is counted too
        drained = time.monotonic()
    finally:
        worker.stop()
    runs = {task_id: int(n) for task_id, n in ledger.hgetall("runs").items()}
    retried = {task_id: int(n) for task_id, n in ledger.hgetall("retried").items()}
    duplicates, _, _ = count_duplicates(enqueuer.committed, {}, runs, retried)
    effects = ledger.hgetall("effects")
    lost = [i for i in enqueuer.committed if i not in runs]
    Outcome(
        scenario="outbox relay SIGKILL (2 relays)",
        tasks=TASKS,
        confirmed=len(enqueuer.committed),
        republished=0,
        lost=len(lost),
        duplicates=duplicates,
        duplicate_bound=KILLS * BATCH_SIZE,
        republish_duplicates=0,
        dead_lettered=0,
        faults=KILLS,
        seconds=round(published - started, 1),
        drain_seconds=round(drained - published, 1),
        slowest_publish=0.0,
        lost_ids=lost,
        notes=f"{len(enqueuer.rolled_back)} rolled back",
    ).record()
    keys = [key for key in enqueuer.committed.values() if key]
    assert len(enqueuer.committed) + len(enqueuer.rolled_back) == TASKS
    assert lost == []
    assert [i for i in enqueuer.rolled_back if i in runs] == []
    assert duplicates <= KILLS * BATCH_SIZE
    assert {k: int(effects.get(k, 0)) for k in keys} == dict.fromkeys(keys, 1)
