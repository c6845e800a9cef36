"""The batch tasks: thin wrappers around tasks.batch.runner and tasks.batch.publishing, on the
`batch` queue by name. Nothing below this module imports it; the API hands `TASKS` down."""

from __future__ import annotations

import math
from typing import Any

from celery import Task
from celery.utils.log import get_task_logger

from tasks.batch import codec, runner
from tasks.batch.chunking import file_chunks
from tasks.batch.publishing import Attempt, BatchTasks, publish_attempt
from tasks.batch.store import store_for
from tasks.celery_app import app

logger = get_task_logger(__name__)


@app.task(name="batch.process_chunk", bind=True, ignore_result=True)
def process_chunk(
    self: Task[..., Any],
    batch_id: str,
    attempt: int,
    chunk_no: int,
    start: int,
    items: str | list[Any],
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Process one chunk of a batch. Idempotent: a redelivered chunk is counted once.

    `items` is the chunk's items as JSON text (tasks.batch.codec), or a list; ``extras``
    says how to read them and where they came from (runner.run_chunk).
    """
    conf = self.app.conf
    outcome = runner.run_chunk(
        store_for(self.app),
        batch_id,
        attempt,
        chunk_no,
        start,
        codec.decode(items, plain=bool(extras and extras.get("plain"))),
        extras,
        item_attempts=int(conf.conveyor_batch_item_attempts),
        backoff=float(conf.conveyor_batch_item_backoff),
    )
    if not outcome.counted:
        logger.info("batch %s chunk %s:%s was already counted", batch_id, attempt, chunk_no)
    if outcome.ready:
        finalize.delay(batch_id, attempt)
    return {"succeeded": outcome.succeeded, "failed": outcome.failed, "skipped": outcome.skipped}


@app.task(name="batch.finalize", bind=True)
def finalize(self: Task[..., Any], batch_id: str, attempt: int) -> str:
    """Reduce the chunks' partials and send the callback, once per attempt; returns the state."""

    def send_callback(name: str, task_id: str) -> None:
        self.app.send_task(name, args=[batch_id], task_id=task_id)

    # A claim outlives a holder that died before sending by this long (the idempotency lease).
    lease = float(self.app.conf.conveyor_idempotency_lease)
    try:
        state = runner.run_finalize(
            store_for(self.app), batch_id, attempt, send_callback, lease=lease
        )
    except runner.CallbackInProgress as exc:
        # The holder has sent it by then, or died and this run takes the claim over.
        raise self.retry(exc=exc, countdown=math.ceil(exc.retry_in) + 1) from exc
    logger.info("batch %s attempt %s finalized: %s", batch_id, attempt, state)
    return state


#: What the publishing stage sends.
TASKS = BatchTasks(process_chunk, finalize)


@app.task(name="batch.publish_file", bind=True)
def publish_file(self: Task[..., Any], batch_id: str, path: str, fmt: str) -> int:
    """Read a batch's input file and publish its chunks (submit_file(publish_in_worker=True))
    as attempt 1; returns how many items it had.

    An error this task retries (tasks.base.Task's autoretry_for) leaves the batch as it is; one
    it does not, or the last retry's, ends the batch in state publish_failed.
    """

    def final(exc: BaseException) -> bool:
        # Read as Celery reads it (tasks.base.Task sets it; the stubs of Task do not know it).
        retried = isinstance(exc, getattr(self, "autoretry_for", ()))
        return not retried or self.request.retries >= (self.max_retries or 0)

    store = store_for(self.app)
    size = int(store.meta(batch_id)["chunk_size"])
    attempt = Attempt(self.app, TASKS, store, batch_id)
    count = publish_attempt(attempt, file_chunks(path, fmt, size), final=final)
    logger.info("batch %s: published %s items from %s", batch_id, count, path)
    return count
