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
from itertools import islice
from pathlib import Path
from typing import Any

from tasks.batch import codec, handlers
from tasks.batch.publisher import ConfirmedPublisher
from tasks.batch.store import FINAL_STATES, BatchStore, Status, store_for

__all__ = [
    "Entry",
    "cancel",
    "failures",
    "publish_file",
    "read_csv",
    "read_jsonl",
    "retry",
    "status",
    "submit",
    "submit_file",
    "wait",
]


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


def _publish(
    app: Any, store: BatchStore, batch_id: str, attempt: int, chunks: Iterable[Chunk]
) -> tuple[int, int]:
    """Publish the chunks with pipelined confirms; returns (items, chunks) published.

    Every 50 chunks it shows progress in the batch's total and stops if the batch was
    cancelled meanwhile.
    """
    from tasks.batch.tasks import process_chunk

    conf = app.conf
    count = published = 0
    with ConfirmedPublisher(
        app,
        max_unconfirmed=int(conf.conveyor_batch_max_unconfirmed),
        timeout=float(conf.conveyor_publish_timeout),
    ) as publisher:
        for start, items, extras in chunks:
            payload, plain = codec.encode(items)
            if plain:
                extras = {**extras, "plain": True}
            args = [batch_id, attempt, published, start, payload, extras]
            shown = f"({batch_id!r}, {attempt}, {published}, {start}, <{len(items)} items>)"
            publisher.send(process_chunk, args, f"{batch_id}.{attempt}.{published}", shown)
            published += 1
            count += len(items)
            if published % 50 == 0:
                if store.cancelled(batch_id):
                    break
                if attempt == 1:
                    store.note_published(batch_id, count)
    return count, published


def _create(
    handler: str,
    *,
    chunk_size: int | None,
    options: Mapping[str, Any] | None,
    callback: str | None,
    source: str,
    app: Any,
) -> tuple[Any, BatchStore, str, int]:
    """Check the handler and options, record a new batch; returns (app, store, id, chunk size)."""
    app = _app(app)
    size = int(chunk_size or app.conf.conveyor_batch_chunk_size)
    if size < 1:
        raise ValueError("chunk_size must be at least 1")
    options = dict(options or {})
    handlers.get(handler)(options)  # unknown handler or bad options: fail here, not per item
    store = store_for(app)
    batch_id = uuid.uuid4().hex
    store.create(
        batch_id,
        handler=handler,
        options=options,
        chunk_size=size,
        source=source,
        callback=callback,
    )
    return app, store, batch_id, size


def _publish_attempt(
    app: Any,
    store: BatchStore,
    batch_id: str,
    attempt: int,
    chunks: Iterable[Chunk],
    *,
    total: int | None = None,
) -> int:
    """Publish an attempt's chunks, then record that it is fully published (and finalize it
    if the workers are already done); returns how many items were published."""
    count, published = _publish(app, store, batch_id, attempt, chunks)
    if store.mark_published(batch_id, attempt, count if total is None else total, published):
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
    when every chunk is confirmed by the broker (about a second for 100,000 rows); workers
    start on the first chunks meanwhile.
    """
    app, store, batch_id, size = _create(
        handler,
        chunk_size=chunk_size,
        options=options,
        callback=callback,
        source="iterable",
        app=app,
    )
    _publish_attempt(app, store, batch_id, 1, plain_chunks(items, size))
    return batch_id


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
    item's line number for its failure report.

    With ``publish_in_worker=True`` it returns the batch id at once and a `batch.publish_file`
    task reads and publishes the file; the workers must see it at the same path (shared
    storage). That task may run twice (a worker killed mid-publish): it republishes the same
    chunks under the same numbers, and the ones already counted are recognised as such.
    """
    fmt = file_format(path, format_name)
    app, _store, batch_id, _size = _create(
        handler,
        chunk_size=chunk_size,
        options=options,
        callback=callback,
        source=str(path),
        app=app,
    )
    if publish_in_worker:
        from tasks.batch.tasks import publish_file as publish_file_task

        publish_file_task.delay(batch_id, str(path), fmt)
    else:
        publish_file(batch_id, path, fmt, app=app)
    return batch_id


def publish_file(batch_id: str, path: str | Path, fmt: str, *, app: Any = None) -> int:
    """Publish a created batch's file input as attempt 1; returns how many items it had."""
    app = _app(app)
    store = store_for(app)
    size = int(store.meta(batch_id)["chunk_size"])
    entries = enumerate(_readers()[fmt](Path(path)))
    return _publish_attempt(app, store, batch_id, 1, entry_chunks(entries, size, contiguous=True))


def status(batch_id: str, *, app: Any = None) -> Status:
    return store_for(_app(app)).status(batch_id)


def failures(batch_id: str, *, app: Any = None) -> list[dict[str, Any]]:
    """The failed items of the latest attempt, by item index."""
    return sorted(store_for(_app(app)).failures(batch_id), key=lambda f: int(f["index"]))


def cancel(batch_id: str, *, app: Any = None) -> bool:
    """Cancel a running batch: chunks not yet started are skipped. False if already finished."""
    return store_for(_app(app)).cancel(batch_id)


def retry(batch_id: str, *, app: Any = None) -> int:
    """Re-run the failed items as the batch's next attempt; returns how many were re-queued."""
    app = _app(app)
    store = store_for(app)
    meta = store.meta(batch_id)
    attempt, retrying = store.begin_retry(batch_id)

    def entries() -> Iterator[tuple[int, Entry]]:
        for _index, raw in store.iter_hash(retrying):
            failure = json.loads(raw)
            error = failure["error"] if failure.get("input_error") else None
            yield int(failure["index"]), Entry(failure["item"], failure.get("line"), error)

    chunks = entry_chunks(entries(), int(meta["chunk_size"]), contiguous=False)
    count = _publish_attempt(app, store, batch_id, attempt, chunks, total=int(meta["total"]))
    store.redis.delete(retrying)
    return count


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
