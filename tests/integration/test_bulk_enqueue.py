"""tasks.bulk.enqueue_many: many tasks on one pipelined, confirmed channel, run by a real worker."""

from __future__ import annotations

import pytest
from celery.result import AsyncResult

from tasks.bulk import BulkEnqueueError, enqueue_many
from tests import worker_tasks
from tests.infra import WorkerProcess

pytestmark = pytest.mark.integration


def test_every_bulk_enqueued_task_runs_with_its_own_arguments(worker: WorkerProcess) -> None:
    # When 500 calls go out in one bulk enqueue, more than one confirm window's worth
    ids = enqueue_many(worker_tasks.add, ((n, 1000) for n in range(500)), max_unconfirmed=64)

    # Then it returns one id per call, in order, and each task runs with its arguments
    assert len(set(ids)) == 500
    results = [AsyncResult(task_id, app=worker_tasks.app) for task_id in ids]
    assert [r.get(timeout=60) for r in results] == [n + 1000 for n in range(500)]


def test_a_bad_call_stops_the_bulk_enqueue_with_a_clear_error_and_the_ids_so_far(
    worker: WorkerProcess,
) -> None:
    calls = [(1, 2), (3, 4), (5,), (7, 8)]  # the third lacks an argument
    with pytest.raises(BulkEnqueueError) as failed:
        enqueue_many(worker_tasks.add, calls)
    assert isinstance(failed.value.__cause__, TypeError)
    # The ids of the calls before it and of the refused one; the last call was never tried
    assert len(failed.value.ids) == 3
    first, second, _refused = failed.value.ids
    assert AsyncResult(first, app=worker_tasks.app).get(timeout=30) == 3
    assert AsyncResult(second, app=worker_tasks.app).get(timeout=30) == 7
