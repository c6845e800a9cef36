"""One-off delayed jobs: held by the broker, on time, cancellable across worker restarts."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import worker_tasks
from tests.infra import RabbitNode, WorkerProcess
from tests.scheduling.conftest import await_delayed_delivery, celery_cli

pytestmark = pytest.mark.integration


def inspect_scheduled(broker_url: str, result_backend: str, node: str) -> Any:
    """`celery -A tasks inspect scheduled --json`, as an operator would run it."""
    done = celery_cli(
        *("inspect", "scheduled", "--json", "--destination", node),
        env={"CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_delayed_jobs_arrive_within_a_second_of_their_due_time_and_wait_in_the_broker(
    sched_worker: WorkerProcess, broker_url: str, result_backend: str, record_property: Any
) -> None:
    # Given jobs due at whole and fractional delays, by countdown and by eta
    sent = time.time()
    due = [sent + 4, sent + 4.5, sent + 5.3]
    results = [
        worker_tasks.ran_at.apply_async(countdown=4),
        worker_tasks.ran_at.apply_async(countdown=4.5),
        worker_tasks.ran_at.apply_async(eta=datetime.fromtimestamp(due[2], UTC)),
    ]

    # While they wait, `celery inspect scheduled` shows the worker holds none of them
    time.sleep(1.5)
    assert inspect_scheduled(broker_url, result_backend, sched_worker.node) == {
        sched_worker.node: []
    }

    # Then each runs no earlier than due and less than a second after
    lateness = [
        result.get(timeout=30) - due_at for result, due_at in zip(results, due, strict=True)
    ]
    record_property("lateness_seconds", [round(late, 3) for late in lateness])
    assert all(0 <= late < 1.0 for late in lateness), lateness


@pytest.mark.slow
def test_a_job_delayed_past_consumer_timeout_is_delivered_and_no_worker_exits(
    tmp_path: Path, conveyor_app: Any, result_backend: str, ledger_url: str
) -> None:
    # F13. Given a private broker whose consumer_timeout is 60 s
    node = RabbitNode(tmp_path / "rabbit", consumer_timeout_ms=60_000).start()
    process = WorkerProcess(
        broker_url=node.url,
        result_backend=result_backend,
        workdir=tmp_path / "worker",
        name="timeout-worker",
        env={"CONVEYOR_TEST_LEDGER_URL": ledger_url},
    )
    try:
        process.start()
        with conveyor_app.connection_for_write(node.url) as connection:
            await_delayed_delivery(connection)
            # When a job is delayed 90 s, well past the timeout
            sent = time.time()
            due = sent + 90
            result = worker_tasks.ran_at.apply_async(countdown=90, connection=connection)
            time.sleep(70)
            assert inspect_scheduled(node.url, result_backend, process.node) == {process.node: []}
        # Then it runs on time and the worker never exited
        lateness = result.get(timeout=60) - due
        assert 0 <= lateness < 1.0, lateness
        assert process.process is not None and process.process.poll() is None
        assert "PRECONDITION_FAILED" not in process.log()
        assert "Unrecoverable error" not in process.log()
    finally:
        process.stop()
        node.stop()


def test_an_eta_in_the_past_runs_at_once() -> None:
    # Guard for the rounding in tasks/base.py: an eta already passed is not a delay at all.
    from tasks.base import publish_options

    now = datetime.now(UTC)
    options = publish_options({"eta": now - timedelta(seconds=5)}, publish_timeout=1, now=now)
    assert "countdown" not in options
