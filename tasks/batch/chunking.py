"""Chunking, the second stage of a batch: items or Entries cut into chunk messages, lazily.

A chunk is ``(start index, items, extras)``; its message's arguments come from `chunk_args`.
The producer holds one chunk at a time: nothing here reads beyond the chunk it builds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from tasks.base import ArgumentsTooLarge, argument_size
from tasks.batch import codec
from tasks.batch.inputs import Entry, reader

#: (start index, items, extras) of one chunk message; see runner.run_chunk for extras.
Chunk = tuple[int, list[Any], dict[str, Any]]


def plain_chunks(items: Iterable[Any], size: int) -> Iterator[Chunk]:
    """Chunks of plain items, sliced straight off the iterator: nothing per item in Python."""
    iterator = iter(items)
    start = 0
    while chunk := list(islice(iterator, size)):
        yield start, chunk, {}
        start += len(chunk)


def _extras(batch: list[tuple[int, Entry]], contiguous: bool) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if not contiguous:
        extras["indices"] = [index for index, _ in batch]
    lines = [entry.line for _, entry in batch]
    if any(line is not None for line in lines):
        extras["lines"] = lines
    errors = {str(n): e.error for n, (_, e) in enumerate(batch) if e.error is not None}
    if errors:
        extras["errors"] = errors
    return extras


def entry_chunks(
    entries: Iterable[tuple[int, Entry]], size: int, *, contiguous: bool
) -> Iterator[Chunk]:
    """Chunks of (index, Entry) pairs, carrying line numbers, input errors and, for retries
    (not contiguous), each item's index."""
    iterator = iter(entries)
    while batch := list(islice(iterator, size)):
        yield batch[0][0], [entry.item for _, entry in batch], _extras(batch, contiguous)


def file_chunks(path: str | Path, fmt: str, size: int) -> Iterator[Chunk]:
    """The chunks of a CSV or JSONL file, each item with its line."""
    return entry_chunks(enumerate(reader(fmt)(path)), size, contiguous=True)


def retry_chunks(failures: Iterable[Mapping[str, Any]], size: int) -> Iterator[Chunk]:
    """The chunks of a retry attempt: failed items (records as runner.run_chunk stores them),
    each with its original index (so its idempotency key is unchanged) and input line."""
    entries = (
        (int(failure["index"]), Entry(failure["item"], failure.get("line"))) for failure in failures
    )
    return entry_chunks(entries, size, contiguous=False)


def chunk_args(
    batch_id: str, attempt: int, chunk_no: int, start: int, items: list[Any], extras: Any
) -> list[Any]:
    """The arguments of one batch.process_chunk message."""
    payload, plain = codec.encode(items)
    if plain:
        extras = {**extras, "plain": True}
    return [batch_id, attempt, chunk_no, start, payload, extras]


def too_large(args: list[Any], items: int, limit: int) -> ArgumentsTooLarge | None:
    """The error for a chunk message over `limit` bytes, measured as tasks.base measures it."""
    size = argument_size(args, {})
    if size is None or size <= limit:
        return None
    return ArgumentsTooLarge(
        f"chunk {args[2]} ({items} items) encodes to {size} bytes, over the limit of {limit} "
        "bytes a message (conveyor_max_argument_bytes): give a smaller chunk_size"
    )
