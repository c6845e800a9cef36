"""The producer cuts its input into chunks lazily: it never reads beyond the chunk it builds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tasks.batch import chunking
from tasks.batch.inputs import Entry


def _counting(items: list[Any], taken: list[int]) -> Iterator[Any]:
    for item in items:
        taken[0] += 1
        yield item


def test_plain_chunks_read_one_chunk_at_a_time() -> None:
    taken = [0]
    chunks = chunking.plain_chunks(_counting(list(range(1_000)), taken), 100)

    seen = []
    for start, items, extras in chunks:
        seen.append(taken[0])
        assert (start, len(items), extras) == (len(seen) * 100 - 100, 100, {})

    # When chunk k is handed on, the input was read exactly up to its end
    assert seen == [100 * k for k in range(1, 11)]


def test_entry_chunks_read_one_chunk_at_a_time() -> None:
    taken = [0]
    entries = [(n, Entry({"n": n}, n + 2)) for n in range(250)]
    chunks = chunking.entry_chunks(_counting(entries, taken), 100, contiguous=True)

    seen = [(taken[0], start, len(items)) for start, items, _extras in chunks]

    assert seen == [(100, 0, 100), (200, 100, 100), (250, 200, 50)]
