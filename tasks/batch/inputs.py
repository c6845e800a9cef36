"""Input readers, the first stage of a batch: a file's items, streamed, as Entries.

The pipeline is inputs -> chunking -> publishing -> api; each stage imports only the ones
before it (and the store), never the Celery tasks module.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Entry", "fields", "file_format", "read_csv", "read_jsonl", "reader"]


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


def _csv_row(header: list[str], row: list[str], line: int) -> Entry | None:
    """A row as an Entry (None for a blank row); a ragged row is a failed item."""
    if not row:
        return None
    if len(row) != len(header):
        error = f"malformed row: {len(row)} fields, the header has {len(header)}"
        return Entry(",".join(row), line, error)
    return Entry(dict(zip(header, row, strict=True)), line)


def read_csv(path: str | Path) -> Iterator[Entry]:
    """One item (a dict keyed by the header) per row; a ragged row becomes a failed item."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        while header is not None:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Entry(None, line, f"malformed CSV: {exc}")
                continue
            entry = _csv_row(header, row, line)
            if entry is not None:
                yield entry


def _csv_header(path: str | Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        return next(csv.reader(handle), [])


_READERS: dict[str, Callable[[str | Path], Iterator[Entry]]] = {
    "csv": read_csv,
    "jsonl": read_jsonl,
}
#: What each format's records are keyed by, read before anything is published (None: the
#: format has no header; a handler then checks its options against the items as they come).
_FIELDS: dict[str, Callable[[str | Path], list[str]] | None] = {"csv": _csv_header, "jsonl": None}


def file_format(path: str | Path, given: str | None = None) -> str:
    """The input format (csv or jsonl): `given`, else the file's suffix."""
    fmt = (given or Path(path).suffix.lstrip(".")).lower()
    fmt = {"ndjson": "jsonl", "json": "jsonl"}.get(fmt, fmt)
    if fmt not in _READERS:
        raise ValueError(f"cannot tell the format of {path}; give csv or jsonl")
    return fmt


def reader(fmt: str) -> Callable[[str | Path], Iterator[Entry]]:
    """The reader of a format file_format returned."""
    return _READERS[fmt]


def fields(path: str | Path, fmt: str) -> list[str] | None:
    """The field names every record of the file has (a CSV's header), or None if the format
    does not say them up front."""
    read = _FIELDS[fmt]
    return None if read is None else read(path)
