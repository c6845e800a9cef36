"""What the batch tasks do, as plain functions over a BatchStore (testable without a broker)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from tasks.batch import handlers
from tasks.batch.store import BatchStore


@dataclass(frozen=True)
class ChunkOutcome:
    succeeded: int
    failed: int
    skipped: int
    counted: bool  # False when a redelivered chunk found itself already counted
    ready: bool  # True when the batch is complete and must be finalized


def describe(exc: BaseException) -> str:
    if isinstance(exc, handlers.ItemError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _retrying(
    handler: handlers.Handler,
    item: Any,
    key: str,
    attempts: int,
    backoff: float,
    error: BaseException,
) -> Any:
    """Try an item whose first try raised the transient `error` again, `attempts` tries in all,
    backing off backoff, 2*backoff, ...; raises the last transient error if none succeeds."""
    for retry in range(attempts - 1):
        time.sleep(backoff * 2**retry)
        try:
            return handler.process(item, key)
        except handler.transient as exc:
            error = exc
    raise error


#: Why the items left when a chunk reaches its soft time limit fail (retry re-runs them).
SOFT_LIMIT_REASON = "the chunk reached its soft time limit"


def _fail(failed: dict[int, str], invalid: set[int] | None, offset: int, exc: Exception) -> None:
    failed[offset] = describe(exc)
    if invalid is not None and isinstance(exc, handlers.InvalidItemError):
        invalid.add(offset)


def process_items(
    handler: handlers.Handler,
    batch_id: str,
    entries: Iterable[tuple[int, int, Any]],
    *,
    item_attempts: int = 3,
    backoff: float = 0.1,
    invalid: set[int] | None = None,
) -> tuple[list[Any], dict[int, str]]:
    """Run the handler over (offset, index, item) entries, item key ``<batch id>:<index>``.

    Returns the values of the items that succeeded and ``{offset: reason}`` for those that
    failed. This loop is every batch's hot path, and the benchmark's ceiling runs it too:
    per item there is only the key, the call and the append. An exception leaves the inner
    loop; the shared iterator then resumes after the item that raised. The offsets of items
    the handler refused as invalid (InvalidItemError) are added to `invalid`, if given.
    """
    values: list[Any] = []
    failed: dict[int, str] = {}
    append = values.append
    process = handler.process
    prefix = f"{batch_id}:"
    remaining = iter(entries)
    offset, item, key = 0, None, ""
    while True:
        try:
            for offset, index, item in remaining:  # noqa: B007  (offset: for the handlers below)
                key = f"{prefix}{index}"
                append(process(item, key))
            return values, failed
        except SoftTimeLimitExceeded:
            # The hard limit follows shortly: count what is done, fail the rest (retryable),
            # rather than lose the whole chunk's outcome to the kill.
            failed[offset] = SOFT_LIMIT_REASON
            failed.update((rest, SOFT_LIMIT_REASON) for rest, _index, _item in remaining)
            return values, failed
        except handler.transient as exc:
            try:
                append(_retrying(handler, item, key, item_attempts, backoff, exc))
            except Exception as last:
                _fail(failed, invalid, offset, last)
        except Exception as exc:
            _fail(failed, invalid, offset, exc)


@dataclass(frozen=True)
class _Chunk:
    """A chunk message as the worker reads it; see run_chunk."""

    items: Sequence[Any]
    indices: Sequence[int]
    lines: Sequence[int | None] | None
    unreadable: dict[int, str]  # offset -> why the producer could not read the item

    @classmethod
    def read(cls, start: int, items: Sequence[Any], extras: Mapping[str, Any]) -> _Chunk:
        errors = extras.get("errors") or {}
        return cls(
            items=items,
            indices=extras.get("indices") or range(start, start + len(items)),
            lines=extras.get("lines"),
            unreadable={int(offset): error for offset, error in errors.items()},
        )

    def entries(self) -> Iterable[tuple[int, int, Any]]:
        """(offset, index, item) of the items to run: unreadable rows fail as they are."""
        entries = zip(range(len(self.items)), self.indices, self.items, strict=False)
        if not self.unreadable:
            return entries
        return (entry for entry in entries if entry[0] not in self.unreadable)

    def failure(self, offset: int, error: str, attempt: int, kind: str) -> dict[str, Any]:
        """The record of a failed item, as `batch failures` shows it and a retry reads it.

        ``kind``: ``unreadable`` (the producer could not read the row), ``invalid`` (the
        handler refused the item itself, InvalidItemError) or ``error`` (anything else);
        ``input_error`` is true for the first two, which a retry leaves failed."""
        return {
            "index": self.indices[offset],
            "line": self.lines[offset] if self.lines is not None else None,
            "error": error,
            "item": self.items[offset],
            "attempt": attempt,
            "kind": kind,
            "input_error": kind != "error",
        }


@dataclass
class _Run:
    """What running a chunk's items produced."""

    handler: handlers.Handler | None = None
    values: list[Any] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    invalid: set[int] = field(default_factory=set)

    def partial(self) -> Any:
        return self.handler.combine(self.values) if self.handler and self.values else None

    def kind(self, offset: int, chunk: _Chunk) -> str:
        if offset in chunk.unreadable:
            return "unreadable"
        return "invalid" if offset in self.invalid else "error"


def _run_items(
    name: str, options: dict[str, Any], batch_id: str, chunk: _Chunk, **retrying: Any
) -> _Run:
    """Run the handler over the chunk's readable items (`retrying`: process_items' tries)."""
    run = _Run()
    try:
        run.handler = handlers.get(name)(options)
    except Exception as exc:
        # Every item fails with the reason; `batch retry` re-runs them once it is fixed.
        reason = f"handler {name!r} unavailable: {describe(exc)}"
        run.failed = {offset: reason for offset, _index, _item in chunk.entries()}
        return run
    run.values, run.failed = process_items(
        run.handler, batch_id, chunk.entries(), invalid=run.invalid, **retrying
    )
    return run


def run_chunk(
    store: BatchStore,
    batch_id: str,
    attempt: int,
    chunk_no: int,
    start: int,
    items: Sequence[Any],
    extras: Mapping[str, Any] | None = None,
    *,
    item_attempts: int = 3,
    backoff: float = 0.1,
) -> ChunkOutcome:
    """Process one chunk and count its outcome exactly once.

    Item i of the chunk has index ``extras["indices"][i]`` (retries) or ``start + i``, input
    line ``extras["lines"][i]`` (file input) and, if the producer could not read it,
    ``extras["errors"][str(i)]``. Nothing is counted until the end, in one atomic step, so a
    chunk interrupted half-way counts nothing and its redelivery counts everything once.
    """
    done = f"{attempt}:{chunk_no}"
    cancelled, name, options = store.begin_chunk(batch_id)
    if cancelled:
        counted, ready = store.record_chunk(
            batch_id, done, succeeded=0, failed=0, skipped=len(items)
        )
        return ChunkOutcome(0, 0, len(items), counted, ready)

    chunk = _Chunk.read(start, items, extras or {})
    run = _run_items(name, options, batch_id, chunk, item_attempts=item_attempts, backoff=backoff)
    failures = {
        chunk.indices[offset]: chunk.failure(offset, error, attempt, run.kind(offset, chunk))
        for offset, error in (chunk.unreadable | run.failed).items()
    }
    succeeded = len(items) - len(failures)
    counted, ready = store.record_chunk(
        batch_id,
        done,
        succeeded=succeeded,
        failed=len(failures),
        partial=run.partial(),
        failures=failures,
    )
    return ChunkOutcome(succeeded, len(failures), 0, counted, ready)


class CallbackInProgress(Exception):
    """Another finalize run has claimed the callback; try again once its lease has ended."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"another finalize run is sending the callback (lease: {retry_in:.1f}s)")
        self.retry_in = retry_in


def run_finalize(
    store: BatchStore,
    batch_id: str,
    attempt: int,
    send_callback: Callable[[str, str], None],
    *,
    lease: float = 60.0,
) -> str:
    """Reduce and store the result once, then send the user's callback once; returns the state.

    Several finalize runs may overlap (the last chunk and its redelivery both see the batch
    complete). The Lua script in store.finalize stores one run's result; the callback is claimed
    before it is sent, so one run sends it. A run that finds another's claim raises
    CallbackInProgress: should that holder have died before sending, the claim's `lease` ends
    and a later run sends it. Should the holder die after sending but before marking it sent,
    the later run sends it again, with the same task id ``<batch id>.callback.<attempt>``.
    """
    meta = store.meta(batch_id)
    if meta.get("finalized") != str(attempt):
        _reduce_once(store, batch_id, attempt, meta)
        meta = store.meta(batch_id)
    if meta.get("finalized") != str(attempt):
        return meta.get("state", "running")  # cancelled, or not complete (nothing to do)
    callback = meta.get("callback")
    if callback:
        _send_once(
            store,
            batch_id,
            attempt,
            lambda: send_callback(callback, f"{batch_id}.callback.{attempt}"),
            lease,
        )
    # A late finalize of an earlier attempt may find a retry running: no state yet.
    return meta.get("state", "running")


def _reduce_once(store: BatchStore, batch_id: str, attempt: int, meta: Mapping[str, str]) -> None:
    """Reduce the partials and store the result and final state, unless another run has."""
    try:
        handler = handlers.get(meta["handler"])(json.loads(meta["options"]))
        result = handler.reduce(store.iter_partials(batch_id))
        failed = int(meta["failed"])
    except Exception as exc:
        result, failed = {"reduce_error": describe(exc)}, 1
    state = "completed" if failed == 0 else "completed_with_failures"
    store.finalize(batch_id, attempt, state, result)


def _send_once(
    store: BatchStore, batch_id: str, attempt: int, send: Callable[[], None], lease: float
) -> None:
    """Send the attempt's callback under a claim, unless it was sent or another run holds it."""
    token = uuid.uuid4().hex
    claim, wait = store.claim_callback(batch_id, attempt, token, lease)
    if claim == "held":
        raise CallbackInProgress(wait)
    if claim != "claimed":
        return  # sent already
    try:
        send()
    except BaseException:
        store.settle_callback(batch_id, attempt, token, sent=False)
        raise
    store.settle_callback(batch_id, attempt, token, sent=True)
