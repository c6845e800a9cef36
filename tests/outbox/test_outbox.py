"""The outbox end to end: a real PostgreSQL, relay, broker and worker."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.orm import Session

from monitoring.outbox import OutboxCollector, overview_section
from tasks import outbox
from tests.infra import WorkerProcess, wait_for
from tests.outbox.conftest import RelayFactory, waiting_rows

pytestmark = pytest.mark.integration


def test_a_committed_task_runs_and_a_rolled_back_one_is_never_published(
    conveyor_app: Any,
    worker: WorkerProcess,
    broker_url: str,
    outbox_db: str,
    start_relay: RelayFactory,
    ledger: Any,
) -> None:
    from tests.worker_tasks import chaos_work

    start_relay(broker_url)
    engine = sqlalchemy.create_engine(outbox_db.replace("postgresql://", "postgresql+psycopg://"))

    # Given a rolled-back transaction first in the queue, then committed ones of every kind of
    # connection (psycopg 3, SQLAlchemy Connection and Session)
    with psycopg.connect(outbox_db) as db:
        rolled_back = outbox.delay(db, chaos_work, 0)
        db.rollback()
        committed = [outbox.delay(db, chaos_work, 0)]
        db.commit()
    with engine.begin() as connection:
        committed.append(outbox.apply_async(connection, chaos_work, [0], {}, countdown=1))
    with Session(engine) as session, session.begin():
        committed.append(outbox.delay(session, chaos_work, seconds=0))

    # Then every committed task runs, once, and nothing is left waiting
    runs = wait_for(
        lambda: (r := ledger.hgetall("runs")) and all(i in r for i in committed) and r,
        30,
        what="the committed tasks to run",
    )
    assert waiting_rows(outbox_db) == 0
    assert rolled_back not in runs
    assert {i: runs[i] for i in committed} == dict.fromkeys(committed, "1")
    with psycopg.connect(outbox_db) as db:
        rows = db.execute("SELECT task_id FROM conveyor_outbox").fetchall()
    assert sorted(r[0] for r in rows) == sorted(committed)

    # And the exporter and the overview see the counts
    conveyor_app.conf.conveyor_outbox_url = outbox_db
    metrics = {m.name: m for m in OutboxCollector(conveyor_app).collect()}
    published = metrics["conveyor_outbox_published"].samples
    assert sum(s.value for s in published if s.name.endswith("_total")) == len(committed)
    assert [s.value for s in metrics["conveyor_outbox_waiting_rows"].samples] == [0]
    assert overview_section(conveyor_app) == ("outbox", [])
