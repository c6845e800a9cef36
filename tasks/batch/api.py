"""The batch API for web apps and scripts: submit, status, failures, cancel, retry, wait.

    from tasks.batch import api
    batch_id = api.submit_file("aggregate", "sales.csv", chunk_size=1000,
                               options={"key_field": "region", "value_field": "amount"})
    api.status(batch_id).state        # pending, running, completed, ...
    api.status(batch_id).result       # the aggregate, once completed

Input is streamed: the producer holds one chunk at a time (plus the broker's unconfirmed
window), so a file of any size keeps its memory flat.
"""

from __future__ import annotations

import csv
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from core.publisher import ConfirmedPublisher
from tasks.base import ArgumentsTooLarge, argument_size
from tasks.batch import codec, handlers
from tasks.batch.runner import describe
from tasks.batch.store import FINAL_STATES, BatchStore, Status, store_for

__all__ = [
    "ArgumentsTooLarge",
    "Entry",
    "PublishFailed",
    "cancel",
    "count_batches",
    "failure_count",
    "failures",
    "list_batches",
    "publish_file",
    "read_csv",
    "read_jsonl",
    "retry",
    "status",
    "submit",
    "submit_file",
    "wait",
]


class PublishFailed(RuntimeError):
    """Publishing a batch's chunks raised part-way: the batch is in state publish_failed, with
    the reason in its status's `error`. The original exception is the cause."""

    def __init__(self, batch_id: str, reason: str) -> None:
        super().__init__(f"batch {batch_id} failed to publish: {reason}")
        self.batch_id = batch_id
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    """One input item, its line in the input file, and why it could not be read (if so)."""

    item: Any
    line: int | None = None
    error: str | None = None


def read_jsonl(path: str | Path) -> Iterator[Entry]:
    """One item per non-blank line; a line that is not JSON becomes a failed item."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                yield Entry(json.loads(text), number)
            except json.JSONDecodeError as exc:
                yield Entry(text.rstrip("\n"), number, f"malformed JSON: {exc.msg}")


def read_csv(path: str | Path) -> Iterator[Entry]:
    """One item (a dict keyed by the header) per row; a ragged row becomes a failed item."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        width = len(header)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Entry(None, line, f"malformed CSV: {exc}")
                continue
            if not row:
                continue
            if len(row) != width:
                error = f"malformed row: {len(row)} fields, the header has {width}"
                yield Entry(",".join(row), line, error)
                continue
            yield Entry(dict(zip(header, row, strict=True)), line)


def _readers() -> dict[str, Callable[[Path], Iterator[Entry]]]:
    return {"csv": read_csv, "jsonl": read_jsonl}


def file_format(path: str | Path, given: str | None = None) -> str:
    fmt = (given or Path(path).suffix.lstrip(".")).lower()
    fmt = {"ndjson": "jsonl", "json": "jsonl"}.get(fmt, fmt)
    if fmt not in _readers():
        raise ValueError(f"cannot tell the format of {path}; give csv or jsonl")
    return fmt


def _app(app: Any) -> Any:
    if app is not None:
        return app
    from tasks.celery_app import app as default

    return default


#: (start index, items, extras) of one chunk message; see runner.run_chunk for extras.
Chunk = tuple[int, list[Any], dict[str, Any]]


def plain_chunks(items: Iterable[Any], size: int) -> Iterator[Chunk]:
    """Chunks of plain items, sliced straight off the iterator: nothing per item in Python."""
    iterator = iter(items)
    start = 0
    while chunk := list(islice(iterator, size)):
        yield start, chunk, {}
        start += len(chunk)


def entry_chunks(
    entries: Iterable[tuple[int, Entry]], size: int, *, contiguous: bool
) -> Iterator[Chunk]:
    """Chunks of (index, Entry) pairs, carrying line numbers, input errors and, for retries
    (not contiguous), each item's index."""
    iterator = iter(entries)
    while batch := list(islice(iterator, size)):
        extras: dict[str, Any] = {}
        if not contiguous:
            extras["indices"] = [index for index, _ in batch]
        lines = [entry.line for _, entry in batch]
        if any(line is not None for line in lines):
            extras["lines"] = lines
        errors = {str(n): e.error for n, (_, e) in enumerate(batch) if e.error is not None}
        if errors:
            extras["errors"] = errors
        yield batch[0][0], [entry.item for _, entry in batch], extras


def _chunk_args(
    batch_id: str, attempt: int, chunk_no: int, start: int, items: list[Any], extras: Any
) -> list[Any]:
    """The arguments of one batch.process_chunk message."""
    payload, plain = codec.encode(items)
    if plain:
        extras = {**extras, "plain": True}
    return [batch_id, attempt, chunk_no, start, payload, extras]


def _too_large(args: list[Any], items: int, limit: int) -> ArgumentsTooLarge | None:
    """The error for a chunk message over `limit` bytes, measured as tasks.base measures it."""
    size = argument_size(args, {})
    if size is None or size <= limit:
        return None
    return ArgumentsTooLarge(
        f"chunk {args[2]} ({items} items) encodes to {size} bytes, over the limit of {limit} "
        "bytes a message (conveyor_max_argument_bytes): give a smaller chunk_size"
    )


@dataclass
class _Progress:
    items: int = 0
    chunks: int = 0


def _publish(
    app: Any,
    store: BatchStore,
    batch_id: str,
    attempt: int,
    chunks: Iterable[Chunk],
    progress: _Progress,
) -> None:
    """Publish the chunks with pipelined confirms, counting them in `progress`.

    Every 50 chunks it shows progress in the batch's total and stops if the batch was
    cancelled meanwhile.
    """
    from tasks.batch.tasks import process_chunk

    conf = app.conf
    with ConfirmedPublisher(
        app,
        max_unconfirmed=int(conf.conveyor_batch_max_unconfirmed),
        timeout=float(conf.conveyor_publish_timeout),
    ) as publisher:
        for start, items, extras in chunks:
            published = progress.chunks
            args = _chunk_args(batch_id, attempt, published, start, items, extras)
            shown = f"({batch_id!r}, {attempt}, {published}, {start}, <{len(items)} items>)"
            try:
                publisher.send(process_chunk, args, f"{batch_id}.{attempt}.{published}", shown)
            except ArgumentsTooLarge as exc:
                # Say which chunk and what to change, not the generic "pass an id" advice.
                limit = int(conf.conveyor_max_argument_bytes)
                raise (_too_large(args, len(items), limit) or exc) from None
            progress.chunks += 1
            progress.items += len(items)
            if progress.chunks % 50 == 0:
                if store.cancelled(batch_id):
                    break
                if attempt == 1:
                    store.note_published(batch_id, progress.items)


def _prepare(
    app: Any, handler: str, chunk_size: int | None, options: Mapping[str, Any] | None
) -> tuple[Any, int, dict[str, Any]]:
    """Check the handler, options and chunk size; returns (app, chunk size, options)."""
    app = _app(app)
    size = int(chunk_size or app.conf.conveyor_batch_chunk_size)
    if size < 1:
        raise ValueError("chunk_size must be at least 1")
    options = dict(options or {})
    handlers.get(handler)(options)  # unknown handler or bad options: fail here, not per item
    return app, size, options


def _create(
    app: Any,
    handler: str,
    *,
    size: int,
    options: dict[str, Any],
    callback: str | None,
    source: str,
    chunks: Iterator[Chunk] | None = None,
) -> tuple[BatchStore, str, Iterator[Chunk] | None]:
    """Record a new batch; returns (store, id, the chunks to publish).

    Given the chunks, it first reads and measures the first one: a chunk size whose messages
    would be over conveyor_max_argument_bytes raises ArgumentsTooLarge, and no batch is created.
    """
    batch_id = uuid.uuid4().hex
    if chunks is not None:
        first = next(chunks, None)
        if first is not None:
            limit = int(app.conf.conveyor_max_argument_bytes)
            error = _too_large(_chunk_args(batch_id, 1, 0, *first), len(first[1]), limit)
            if error is not None:
                raise error
            chunks = chain([first], chunks)
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


def _publish_attempt(
    app: Any,
    store: BatchStore,
    batch_id: str,
    attempt: int,
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
        _publish(app, store, batch_id, attempt, chunks, progress)
    except (Exception, KeyboardInterrupt) as exc:
        if not final(exc):
            raise
        reason = (
            f"after {progress.chunks} chunk(s) ({progress.items} items) were published: "
            + describe(exc)
        )
        store.fail_publish(batch_id, attempt, reason, progress.items if attempt == 1 else None)
        if isinstance(exc, KeyboardInterrupt):
            raise  # still an interrupt to the caller
        raise PublishFailed(batch_id, reason) from exc
    count = progress.items
    if store.mark_published(batch_id, attempt, count if total is None else total, progress.chunks):
        from tasks.batch.tasks import finalize

        finalize.delay(batch_id, attempt)
    return count


def submit(
    handler: str,
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    callback: str | None = None,
    app: Any = None,
) -> str:
    """Publish a batch of JSON-serialisable items to a named handler; returns the batch id.

    `items` may be any iterable; a generator is read one chunk at a time, never materialised.
    `callback` names a task sent once, with the batch id, when the batch completes. Returns
    when every chunk is confirmed by the broker; workers start on the first chunks meanwhile.
    Raises ArgumentsTooLarge (no batch created) when the first chunk's message would be over
    conveyor_max_argument_bytes, and PublishFailed when publishing raises later on.
    """
    app, size, checked = _prepare(app, handler, chunk_size, options)
    store, batch_id, chunks = _create(
        app,
        handler,
        size=size,
        options=checked,
        callback=callback,
        source="iterable",
        chunks=plain_chunks(items, size),
    )
    assert chunks is not None
    _publish_attempt(app, store, batch_id, 1, chunks)
    return batch_id


def _file_chunks(path: str | Path, fmt: str, size: int) -> Iterator[Chunk]:
    return entry_chunks(enumerate(_readers()[fmt](Path(path))), size, contiguous=True)


def submit_file(
    handler: str,
    path: str | Path,
    *,
    format_name: str | None = None,
    chunk_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    callback: str | None = None,
    publish_in_worker: bool = False,
    app: Any = None,
) -> str:
    """Submit every row of a CSV file or every line of a JSONL file (streamed), keeping each
    item's line number for its failure report. Returns, and raises, as `submit` does.

    With ``publish_in_worker=True`` it returns the batch id at once and a `batch.publish_file`
    task reads and publishes the file; the workers must see it at the same path (shared
    storage). That task may run twice (a worker killed mid-publish): it republishes the same
    chunks under the same numbers, and the ones already counted are recognised as such. If
    it fails for good, the batch ends in state publish_failed with the reason.
    """
    fmt = file_format(path, format_name)
    app, size, checked = _prepare(app, handler, chunk_size, options)
    chunks = None if publish_in_worker else _file_chunks(path, fmt, size)
    store, batch_id, chunks = _create(
        app,
        handler,
        size=size,
        options=checked,
        callback=callback,
        source=str(path),
        chunks=chunks,
    )
    if chunks is not None:
        _publish_attempt(app, store, batch_id, 1, chunks)
        return batch_id
    from tasks.batch.tasks import publish_file as publish_file_task

    try:
        publish_file_task.delay(batch_id, str(path), fmt)
    except Exception as exc:
        reason = f"sending the batch.publish_file task failed: {describe(exc)}"
        store.fail_publish(batch_id, 1, reason, 0)
        raise PublishFailed(batch_id, reason) from exc
    return batch_id


def publish_file(
    batch_id: str,
    path: str | Path,
    fmt: str,
    *,
    app: Any = None,
    final: Callable[[BaseException], bool] = _never_retried,
) -> int:
    """Publish a created batch's file input as attempt 1; returns how many items it had.

    An error for which `final` is true ends the batch in state publish_failed (PublishFailed).
    """
    app = _app(app)
    store = store_for(app)
    size = int(store.meta(batch_id)["chunk_size"])
    return _publish_attempt(app, store, batch_id, 1, _file_chunks(path, fmt, size), final=final)


def status(batch_id: str, *, app: Any = None) -> Status:
    return store_for(_app(app)).status(batch_id)


def failures(
    batch_id: str, *, app: Any = None, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """The failed items of the latest attempt, by item index: `limit` of them (None: all)
    after the first `offset`."""
    return store_for(_app(app)).failure_page(batch_id, limit=limit, offset=offset)


def failure_count(batch_id: str, *, app: Any = None) -> int:
    """How many items of the latest attempt failed."""
    return store_for(_app(app)).failure_count(batch_id)


def list_batches(
    *, app: Any = None, limit: int = 50, offset: int = 0, state: str | None = None
) -> list[Status]:
    """The batches kept in Redis (finished ones until they expire), newest first: `limit`
    of them after the first `offset`, only those in `state` if given. Reads the batch index,
    never the whole keyspace."""
    return store_for(_app(app)).statuses(limit=limit, offset=offset, state=state)


def count_batches(*, app: Any = None) -> int:
    """How many batches are kept in Redis, in any state."""
    return store_for(_app(app)).count()


def cancel(batch_id: str, *, app: Any = None) -> bool:
    """Cancel a running batch: chunks not yet started are skipped. False if already finished."""
    return store_for(_app(app)).cancel(batch_id)


def retry(batch_id: str, *, app: Any = None) -> int:
    """Re-run the failed items as the batch's next attempt; returns how many were re-queued."""
    app = _app(app)
    store = store_for(app)
    meta = store.meta(batch_id)
    attempt, retrying = store.begin_retry(batch_id)

    chunks = retry_chunks(store, retrying, int(meta["chunk_size"]))
    count = _publish_attempt(app, store, batch_id, attempt, chunks, total=int(meta["total"]))
    store.redis.delete(retrying)
    return count


def retry_chunks(store: BatchStore, retrying: str, size: int) -> Iterator[Chunk]:
    """The chunks of a retry attempt: the failed items under `retrying`, each with its original
    index (so its idempotency key is unchanged) and input line."""

    def entries() -> Iterator[tuple[int, Entry]]:
        for _index, raw in store.iter_hash(retrying):
            failure = json.loads(raw)
            error = failure["error"] if failure.get("input_error") else None
            yield int(failure["index"]), Entry(failure["item"], failure.get("line"), error)

    return entry_chunks(entries(), size, contiguous=False)


def wait(
    batch_id: str,
    *,
    timeout: float | None = None,
    interval: float = 0.5,
    app: Any = None,
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
