"""Idempotent effects and enqueue keys with the default settings, against real workers."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection

from tasks.deadletter import store
from tasks.idempotency import ENQUEUE_PREFIX, enqueue_once, task_id_for
from tests import worker_tasks
from tests.chaos.conftest import Chaos, restart
from tests.infra import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

#: The longest the default transient retries take: 1 + 2 + 4 + 8 + 16 s (tasks/base.py).
RETRY_WINDOW = 31


def test_an_effect_whose_holder_was_killed_happens_once_under_the_default_lease(
    chaos: Chaos,
) -> None:
    lease = float(chaos.app.conf.conveyor_idempotency_lease)
    assert lease > RETRY_WINDOW, "the scenario needs a lease that outlasts the retries"
    worker = chaos.start_worker("lease", concurrency=1)
    key = f"order-{uuid.uuid4()}"

    # Given a task killed while it holds its effect's lease
    result = worker_tasks.held_effect.delay(key, 60)
    wait_for(lambda: chaos.ledger.get(f"holding:{key}"), 30, 0.2, "the effect to be running")
    worker.kill_group()
    restart(worker)

    # When its redelivered copy finds the key still leased for most of a minute
    # Then it waits the lease out instead of spending its retries, and the effect happens once
    wait_for(lambda: result.state in ("SUCCESS", "FAILURE"), lease + 60, 1, "the task to finish")
    assert result.state == "SUCCESS", result.result
    assert chaos.ledger.hget("effects", key) == "1"
    assert set(chaos.ledger.lrange(f"retries:{result.id}", 0, -1)) == {"0"}
    assert int(chaos.ledger.hget("runs", result.id) or 0) >= 3  # killed, waited, applied
    with Connection(chaos.rabbit.url) as connection:
        assert store.find(connection, "conveyor.dead_letter", result.id) is None
    assert "lease wait 1" in worker.log()


def test_a_second_enqueue_with_the_same_key_publishes_nothing(
    chaos: Chaos, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # enqueue_once keeps its markers where the settings say, for as long as they say
    monkeypatch.setitem(chaos.app.conf, "conveyor_idempotency_url", ledger_url)
    chaos.start_worker("enqueue", concurrency=1)
    key = f"invoice-{uuid.uuid4()}"

    first = enqueue_once(worker_tasks.chaos_work, key=key, args=(0.0,))
    assert first.get(timeout=30) == first.id == task_id_for("tests.chaos_work", key)
    second = enqueue_once(worker_tasks.chaos_work, key=key, args=(0.0,))
    assert second.id == first.id

    # A task published after the second call has run, so a copy published by it would have too
    assert worker_tasks.chaos_work.delay(0.0).get(timeout=30)
    assert chaos.ledger.hget("runs", first.id) == "1"
    marker = f"{ENQUEUE_PREFIX}tests.chaos_work:{key}"
    ttl = chaos.ledger.ttl(marker)
    assert (
        chaos.app.conf.conveyor_idempotency_ttl - 60
        < ttl
        <= chaos.app.conf.conveyor_idempotency_ttl
    )
