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

from tests.conftest import StartWorker
from tests.scheduling.conftest import INCLUDE, await_delayed_delivery
from workers.cancellation import cancel

pytestmark = pytest.mark.integration


def test_a_cancelled_delayed_job_never_runs_even_on_a_worker_started_after_the_cancel(
    conveyor_app: Any,
    tmp_path: Path,
    broker_url: str,
    result_backend: str,
    start_worker: StartWorker,
    ledger: Any,
) -> None:
    from tests.scheduling import tasks as sched_tasks

    conveyor_app.conf.redbeat_redis_url = result_backend
    options: dict[str, Any] = {
        "broker_url": broker_url,
        "include": INCLUDE,
        "env": {"CONVEYOR_SCHEDULE_REDIS_URL": result_backend},
    }

    # Given two jobs delayed 8 s, one of them cancelled, while the first worker runs
    with start_worker("before-cancel", workdir=tmp_path / "before-cancel", **options):
        await_delayed_delivery()
        kept = sched_tasks.record.apply_async(("kept",), countdown=8)
        cancelled = sched_tasks.record.apply_async(("cancelled",), countdown=8)
        cancel(conveyor_app, cancelled.id)

    # When that worker is replaced by a new one (which never saw Celery's in-memory revoke)
    with start_worker("after-cancel", workdir=tmp_path / "after-cancel", **options) as second:
        # Then only the job that was not cancelled runs, and the other is marked REVOKED
        kept.get(timeout=40)
        deadline = time.time() + 10
        while cancelled.state != "REVOKED" and time.time() < deadline:
            time.sleep(0.2)
        assert cancelled.state == "REVOKED"
        assert ledger.llen("runs:cancelled") == 0
        assert ledger.llen("runs:kept") == 1
        assert "was cancelled; discarding it" in second.log()
