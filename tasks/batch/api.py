"""The batch API for web apps and scripts: submit, status, failures, cancel, retry, wait, list.

    from tasks.batch import api
    batch_id = api.submit_file("aggregate", "examples/sales.csv", chunk_size=1000,
                               options={"key_field": "region", "value_field": "amount"})
    api.status(batch_id).state        # pending, running, completed, ...
    api.status(batch_id).result       # the aggregate, once completed

Input is streamed: the producer holds one chunk at a time (plus the broker's unconfirmed
window), so a file of any size keeps its memory flat. This is the last stage of the batch
pipeline (inputs -> chunking -> publishing -> api) and the one that knows the Celery tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from celery import Celery

from tasks.base import ArgumentsTooLarge
from tasks.batch import chunking, handlers, inputs
from tasks.batch.publishing import Attempt, PublishFailed, create, publish_attempt
from tasks.batch.runner import describe
from tasks.batch.store import FINAL_STATES, Status, store_for
from tasks.batch.tasks import TASKS, publish_file

__all__ = [
    "ArgumentsTooLarge",
    "PublishFailed",
    "cancel",
    "count_batches",
    "failure_count",
    "failures",
    "list_batches",
    "retry",
    "status",
    "submit",
    "submit_file",
    "wait",
]

#: Called with the batch id once the batch is recorded, before its chunks are published.
OnCreated = Callable[[str], None]


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from tasks.celery_app import app as default

    return default


def _prepare(
    app: Celery | None,
    handler: str,
    chunk_size: int | None,
    options: Mapping[str, Any] | None,
    fields: Sequence[str] | None = None,
) -> tuple[Celery, int, dict[str, Any]]:
    """Check the handler, its options against the input's `fields` (when known up front) and
    the chunk size; returns (app, chunk size, the options the batch runs with)."""
    app = _app(app)
    size = int(chunk_size or app.conf.conveyor_batch_chunk_size)
    if size < 1:
        raise ValueError("chunk_size must be at least 1")
    kind = handlers.get(handler)  # unknown handler or bad options: fail here, not per item
    checked = kind.check_input(dict(options or {}), fields)
    kind(checked)
    return app, size, checked


def submit(
    handler: str,
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    callback: str | None = None,
    app: Celery | None = None,
    on_created: OnCreated | None = None,
) -> str:
    """Publish a batch of JSON-serialisable items to a named handler; returns the batch id.

    `items` may be any iterable; a generator is read one chunk at a time, never materialised.
    `callback` names a task sent once, with the batch id, when the batch completes. Returns
    when every chunk is confirmed by the broker; workers start on the first chunks meanwhile
    (`on_created` is called with the id before publishing starts).
    Raises ArgumentsTooLarge (no batch created) when the first chunk's message would be over
    conveyor_max_argument_bytes, and PublishFailed when publishing raises later on.
    """
    app, size, checked = _prepare(app, handler, chunk_size, options)
    store, batch_id, chunks = create(
        app,
        handler,
        size=size,
        options=checked,
        callback=callback,
        source="iterable",
        chunks=chunking.plain_chunks(items, size),
    )
    if on_created is not None:
        on_created(batch_id)
    publish_attempt(Attempt(app, TASKS, store, batch_id), chunks or [])
    return batch_id


def _publish_in_worker(app: Celery, batch_id: str, path: str | Path, fmt: str) -> None:
    try:
        publish_file.delay(batch_id, str(path), fmt)
    except Exception as exc:
        reason = f"sending the batch.publish_file task failed: {describe(exc)}"
        store_for(app).fail_publish(batch_id, 1, reason, 0)
        raise PublishFailed(batch_id, reason) from exc


def submit_file(
    handler: str,
    path: str | Path,
    *,
    format_name: str | None = None,
    chunk_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    callback: str | None = None,
    publish_in_worker: bool = False,
    app: Celery | None = None,
    on_created: OnCreated | None = None,
) -> str:
    """Submit every row of a CSV file or every line of a JSONL file (streamed), keeping each
    item's line number for its failure report. Returns, and raises, as `submit` does.

    A CSV's header is read first: options naming a column it lacks raise ValueError, and
    nothing is published. With ``publish_in_worker=True`` it returns the batch id at once and
    a `batch.publish_file` task reads and publishes the file; the workers must see it at the
    same path (shared storage). That task may run twice (a worker killed mid-publish): it
    republishes the same chunks under the same numbers, and the ones already counted are
    recognised as such. If it fails for good, the batch ends in state publish_failed.
    """
    fmt = inputs.file_format(path, format_name)
    fields = inputs.fields(path, fmt)
    app, size, checked = _prepare(app, handler, chunk_size, options, fields)
    chunks = None if publish_in_worker else chunking.file_chunks(path, fmt, size)
    store, batch_id, chunks = create(
        app, handler, size=size, options=checked, callback=callback, source=str(path), chunks=chunks
    )
    if on_created is not None:
        on_created(batch_id)
    if chunks is None:
        _publish_in_worker(app, batch_id, path, fmt)
    else:
        publish_attempt(Attempt(app, TASKS, store, batch_id), chunks)
    return batch_id


def status(batch_id: str, *, app: Celery | None = None) -> Status:
    return store_for(_app(app)).status(batch_id)


def failures(
    batch_id: str, *, app: Celery | None = None, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """The failed items of the latest attempt, by item index: `limit` of them (None: all)
    after the first `offset`."""
    return store_for(_app(app)).failure_page(batch_id, limit=limit, offset=offset)


def failure_count(batch_id: str, *, app: Celery | None = None) -> int:
    """How many items of the latest attempt failed."""
    return store_for(_app(app)).failure_count(batch_id)


def list_batches(
    *, app: Celery | None = None, limit: int = 50, offset: int = 0, state: str | None = None
) -> list[Status]:
    """The batches kept in Redis (finished ones until they expire), newest first: `limit`
    of them after the first `offset`, only those in `state` if given. Reads the batch index,
    never the whole keyspace."""
    return store_for(_app(app)).statuses(limit=limit, offset=offset, state=state)


def count_batches(*, app: Celery | None = None) -> int:
    """How many batches are kept in Redis, in any state."""
    return store_for(_app(app)).count()


def cancel(batch_id: str, *, app: Celery | None = None) -> bool:
    """Cancel a running batch: chunks not yet started are skipped. False if already finished."""
    return store_for(_app(app)).cancel(batch_id)


def retry(batch_id: str, *, app: Celery | None = None, include_input_errors: bool = False) -> int:
    """Re-run the failed items that can succeed as the batch's next attempt; returns how many
    were re-queued.

    Input errors (rows the producer could not read, items the handler found invalid) fail the
    same way every time: they stay failed unless `include_input_errors` (then the invalid items
    are re-run; an unreadable row never is). ValueError when nothing would be re-run.
    """
    app = _app(app)
    store = store_for(app)
    meta = store.meta(batch_id)
    number, retrying = store.begin_retry(batch_id, include_input_errors=include_input_errors)
    chunks = chunking.retry_chunks(store.iter_values(retrying), int(meta["chunk_size"]))
    attempt = Attempt(app, TASKS, store, batch_id, number)
    count = publish_attempt(attempt, chunks, total=int(meta["total"]))
    store.redis.delete(retrying)
    return count


def wait(
    batch_id: str,
    *,
    timeout: float | None = None,
    interval: float = 0.5,
    app: Celery | None = None,
    on_status: Callable[[Status], None] | None = None,
) -> Status:
    """Poll until the batch is completed or cancelled; TimeoutError after `timeout` seconds."""
    store = store_for(_app(app))
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        current = store.status(batch_id)
        if on_status:
            on_status(current)
        if current.state in FINAL_STATES:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} is still {current.state} after {timeout}s")
        time.sleep(interval)
