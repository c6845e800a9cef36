"""Publishing, the third stage of a batch: a batch recorded, its chunks sent with pipelined
confirms, and the attempt marked fully published (or ended publish_failed).

The Celery tasks are passed in (`BatchTasks`): this module never imports tasks.batch.tasks,
which imports it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from celery import Celery, Task

from core.publisher import ConfirmedPublisher
from tasks.base import ArgumentsTooLarge
from tasks.batch.chunking import Chunk, chunk_args, too_large
from tasks.batch.runner import describe
from tasks.batch.store import BatchStore, store_for

#: Chunks published between two looks at whether the batch was cancelled meanwhile.
_CHECK_EVERY = 50


class PublishFailed(RuntimeError):
    """Publishing a batch's chunks raised part-way: the batch is in state publish_failed, with
    the reason in its status's `error`. The original exception is the cause."""

    def __init__(self, batch_id: str, reason: str) -> None:
        super().__init__(f"batch {batch_id} failed to publish: {reason}")
        self.batch_id = batch_id
        self.reason = reason


class BatchTasks(NamedTuple):
    """The tasks a publisher sends: a chunk's, and the completion step's."""

    process_chunk: Task[..., Any]
    finalize: Task[..., Any]


@dataclass
class _Progress:
    items: int = 0
    chunks: int = 0


@dataclass(frozen=True)
class Attempt:
    """One attempt of one batch, as its publisher sees it."""

    app: Celery
    tasks: BatchTasks
    store: BatchStore
    batch_id: str
    number: int = 1


def _send(publisher: ConfirmedPublisher, attempt: Attempt, chunk: Chunk, chunk_no: int) -> None:
    start, items, extras = chunk
    args = chunk_args(attempt.batch_id, attempt.number, chunk_no, start, items, extras)
    shown = f"({attempt.batch_id!r}, {attempt.number}, {chunk_no}, {start}, <{len(items)} items>)"
    task_id = f"{attempt.batch_id}.{attempt.number}.{chunk_no}"
    try:
        publisher.send(attempt.tasks.process_chunk, args, task_id, shown)
    except ArgumentsTooLarge as exc:
        # Say which chunk and what to change, not the generic "pass an id" advice.
        limit = int(attempt.app.conf.conveyor_max_argument_bytes)
        raise (too_large(args, len(items), limit) or exc) from None


def _publish(attempt: Attempt, chunks: Iterable[Chunk], progress: _Progress) -> None:
    """Publish the chunks with pipelined confirms, counting them in `progress`.

    Every 50 chunks it shows progress in the batch's total and stops if the batch was
    cancelled meanwhile.
    """
    conf = attempt.app.conf
    with ConfirmedPublisher(
        attempt.app,
        max_unconfirmed=int(conf.conveyor_batch_max_unconfirmed),
        timeout=float(conf.conveyor_publish_timeout),
    ) as publisher:
        for chunk in chunks:
            _send(publisher, attempt, chunk, progress.chunks)
            progress.chunks += 1
            progress.items += len(chunk[1])
            if progress.chunks % _CHECK_EVERY == 0:
                if attempt.store.cancelled(attempt.batch_id):
                    break
                if attempt.number == 1:
                    attempt.store.note_published(attempt.batch_id, progress.items)


def _checked_first(
    app: Celery, batch_id: str, chunks: Iterator[Chunk] | None
) -> Iterator[Chunk] | None:
    """The chunks, after measuring the first: ArgumentsTooLarge if its message is too big."""
    first = None if chunks is None else next(chunks, None)
    if first is None:
        return chunks
    limit = int(app.conf.conveyor_max_argument_bytes)
    error = too_large(chunk_args(batch_id, 1, 0, *first), len(first[1]), limit)
    if error is not None:
        raise error
    return chain([first], chunks or [])


def create(
    app: Celery,
    handler: str,
    *,
    size: int,
    options: Mapping[str, Any],
    callback: str | None,
    source: str,
    chunks: Iterator[Chunk] | None = None,
) -> tuple[BatchStore, str, Iterator[Chunk] | None]:
    """Record a new batch; returns (store, id, the chunks to publish).

    Given the chunks, it first reads and measures the first one: a chunk size whose messages
    would be over conveyor_max_argument_bytes raises ArgumentsTooLarge, and no batch is created.
    """
    batch_id = uuid.uuid4().hex
    chunks = _checked_first(app, batch_id, chunks)
    store = store_for(app)
    store.create(
        batch_id,
        handler=handler,
        options=options,
        chunk_size=size,
        source=source,
        callback=callback,
    )
    return store, batch_id, chunks


def _never_retried(exc: BaseException) -> bool:
    return True


def _fail(attempt: Attempt, progress: _Progress, exc: BaseException) -> PublishFailed:
    """End the attempt in state publish_failed; returns the error to raise."""
    reason = (
        f"after {progress.chunks} chunk(s) ({progress.items} items) were published: "
        + describe(exc)
    )
    total = progress.items if attempt.number == 1 else None
    attempt.store.fail_publish(attempt.batch_id, attempt.number, reason, total)
    return PublishFailed(attempt.batch_id, reason)


def publish_attempt(
    attempt: Attempt,
    chunks: Iterable[Chunk],
    *,
    total: int | None = None,
    final: Callable[[BaseException], bool] = _never_retried,
) -> int:
    """Publish an attempt's chunks, then record that it is fully published (and finalize it
    if the workers are already done); returns how many items were published.

    If publishing raises and `final(exc)` (no one will publish this attempt again), the attempt
    ends in state publish_failed with the reason, and PublishFailed is raised (an interrupt is
    re-raised as it is).
    """
    progress = _Progress()
    try:
        _publish(attempt, chunks, progress)
    except (Exception, KeyboardInterrupt) as exc:
        if not final(exc):
            raise
        failed = _fail(attempt, progress, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise  # still an interrupt to the caller
        raise failed from exc
    count = progress.items
    published = count if total is None else total
    if attempt.store.mark_published(attempt.batch_id, attempt.number, published, progress.chunks):
        attempt.tasks.finalize.delay(attempt.batch_id, attempt.number)
    return count
