"""Cancelling a delayed job: the cancellation outlives the workers that saw it.

In a module of its own on purpose: no other worker may be alive, or the new worker would
learn Celery's in-memory revoke from it at start-up (mingle) and the test would not show
that the Redis record alone is enough.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.infra import WorkerProcess
from tests.scheduling.conftest import INCLUDE, await_delayed_delivery
from workers.cancellation import cancel

pytestmark = pytest.mark.integration


def test_a_cancelled_delayed_job_never_runs_even_on_a_worker_started_after_the_cancel(
    conveyor_app: Any,
    tmp_path: Path,
    broker_url: str,
    result_backend: str,
    ledger_url: str,
    ledger: Any,
) -> None:
    from tests.scheduling import tasks as sched_tasks

    conveyor_app.conf.redbeat_redis_url = result_backend
    env = {"CONVEYOR_TEST_LEDGER_URL": ledger_url, "CONVEYOR_SCHEDULE_REDIS_URL": result_backend}

    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(
            broker_url=broker_url,
            result_backend=result_backend,
            workdir=tmp_path / name,
            name=name,
            extra_args=[INCLUDE],
            env=env,
        )

    first, second = worker("before-cancel"), worker("after-cancel")
    try:
        # Given two jobs delayed 8 s, one of them cancelled, while the first worker runs
        first.start()
        await_delayed_delivery()
        kept = sched_tasks.record.apply_async(("kept",), countdown=8)
        cancelled = sched_tasks.record.apply_async(("cancelled",), countdown=8)
        cancel(conveyor_app, cancelled.id)

        # When that worker is replaced by a new one (which never saw Celery's in-memory revoke)
        first.stop()
        second.start()

        # Then only the job that was not cancelled runs, and the other is marked REVOKED
        kept.get(timeout=40)
        deadline = time.time() + 10
        while cancelled.state != "REVOKED" and time.time() < deadline:
            time.sleep(0.2)
        assert cancelled.state == "REVOKED"
        assert ledger.llen("runs:cancelled") == 0
        assert ledger.llen("runs:kept") == 1
        assert "was cancelled; discarding it" in second.log()
    finally:
        first.stop()
        second.stop()
