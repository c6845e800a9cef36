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
from pathlib import Path
from typing import Any

from tasks.batch import handlers
from tasks.batch.publisher import ConfirmedPublisher
from tasks.batch.store import FINAL_STATES, BatchStore, Status, store_for

__all__ = [
    "Entry",
    "cancel",
    "failures",
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


def _publish(
    app: Any,
    store: BatchStore,
    batch_id: str,
    attempt: int,
    entries: Iterable[tuple[int, Entry]],
    chunk_size: int,
    *,
    contiguous: bool,
) -> tuple[int, int]:
    """Stream (index, entry) pairs into chunk messages; returns (items, chunks) published."""
    from tasks.batch.tasks import process_chunk

    conf = app.conf
    items: list[Any] = []
    indices: list[int] = []
    lines: list[int | None] = []
    errors: dict[str, str] = {}
    count = chunks = 0

    def flush(publisher: ConfirmedPublisher) -> None:
        nonlocal chunks
        extras: dict[str, Any] = {}
        if not contiguous:
            extras["indices"] = indices
        if any(line is not None for line in lines):
            extras["lines"] = lines
        if errors:
            extras["errors"] = errors
        args = [batch_id, attempt, chunks, indices[0], items, extras]
        publisher.send(process_chunk, args, f"{batch_id}.{attempt}.{chunks}")
        chunks += 1

    with ConfirmedPublisher(
        app,
        max_unconfirmed=int(conf.conveyor_batch_max_unconfirmed),
        timeout=float(conf.conveyor_publish_timeout),
    ) as publisher:
        for index, entry in entries:
            indices.append(index)
            items.append(entry.item)
            lines.append(entry.line)
            if entry.error is not None:
                errors[str(len(items) - 1)] = entry.error
            count += 1
            if len(items) >= chunk_size:
                flush(publisher)
                items, indices, lines, errors = [], [], [], {}
                if chunks % 50 == 0:
                    if store.cancelled(batch_id):
                        break
                    if attempt == 1:
                        store.note_published(batch_id, count)
        else:
            if items:
                flush(publisher)
    return count, chunks


def submit(
    handler: str,
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    callback: str | None = None,
    source: str = "iterable",
    app: Any = None,
) -> str:
    """Publish a batch of items to a named handler; returns the batch id.

    `items` may be any iterable (a generator is never materialised); pass `Entry` objects to
    attach line numbers or input errors. `callback` names a task sent, once, with the batch id
    when the batch completes. Returns when every chunk is confirmed by the broker, which for a
    100,000-row file takes about a second; the workers may already be done by then.
    """
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
    entries = ((i, e if isinstance(e, Entry) else Entry(e)) for i, e in enumerate(items))
    total, chunks = _publish(app, store, batch_id, 1, entries, size, contiguous=True)
    if store.mark_published(batch_id, 1, total, chunks):
        from tasks.batch.tasks import finalize

        finalize.delay(batch_id, 1)
    return batch_id


def submit_file(
    handler: str,
    path: str | Path,
    *,
    format_name: str | None = None,
    **kwargs: Any,
) -> str:
    """Submit every row of a CSV file or every line of a JSONL file (streamed)."""
    reader = _readers()[file_format(path, format_name)]
    return submit(handler, reader(Path(path)), source=str(path), **kwargs)


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

    count, _chunks = _publish(
        app, store, batch_id, attempt, entries(), int(meta["chunk_size"]), contiguous=False
    )
    store.redis.delete(retrying)
    if store.mark_published(batch_id, attempt, int(meta["total"]), int(meta.get("chunks", 0))):
        from tasks.batch.tasks import finalize

        finalize.delay(batch_id, attempt)
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
