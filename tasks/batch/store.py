"""Batch state in Redis: every counter, marker and result a batch has, and nothing elsewhere.

Key layout (``<id>`` is the batch id; every key expires ``conveyor_batch_expires`` seconds
after the batch's last change, refreshed by each write):

``conveyor:batch:<id>``                   hash: the batch record (handler, options, counters,
                                          times, state, attempt, ...); see ``Status``
``conveyor:batch:<id>:done``              hash ``<attempt>:<chunk>`` -> 1: chunks already counted
``conveyor:batch:<id>:partials``          hash ``<attempt>:<chunk>`` -> JSON: per-chunk map results
``conveyor:batch:<id>:failures``          hash ``<index>`` -> JSON: failed items of this attempt
                                          (and the input errors a retry left failed)
``conveyor:batch:<id>:retrying:<n>``      hash, like failures: the items attempt n re-runs
``conveyor:batch:<id>:result``            string, JSON: the reduced result once completed
``conveyor:batches``                      sorted set, the index: every kept batch's id, score =
                                          creation time; listing and monitoring read it, so
                                          nothing scans the keyspace. An entry is removed once
                                          its batch has expired (``BatchStore.prune_index``).

Counting is exactly once because a chunk's outcome is recorded by one Lua script that first
sets the chunk's "done" marker with HSETNX: a redelivered chunk finds the marker and changes
nothing. The same holds for finalizing: the script sets ``finalized`` to the attempt number only
if it is not set yet, so the reduce result belongs to exactly one run. The user's callback is
claimed before it is sent (``callback_sent:<attempt>``: a claim with a lease, then ``sent``), so
of two finalize runs at the same time only one sends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, cast

import redis
from celery import Celery

from core.clock import iso
from core.redis import client as redis_client

PREFIX = "conveyor:batch:"
#: The batch index: ids by creation time (not under PREFIX: it is no batch's part).
INDEX = "conveyor:batches"
#: Index entries checked at a time when pruning those whose batch has expired.
_PRUNE_PAGE = 200

#: A batch whose producer raised before every chunk was published: the reason is in ``error``,
#: and the chunks it did publish are skipped, as after a cancel. Submit it again.
PUBLISH_FAILED = "publish_failed"
#: Final states: only a retry (of completed_with_failures) leaves one.
FINAL_STATES = frozenset({"completed", "completed_with_failures", "cancelled", PUBLISH_FAILED})

#: Lua scripts, one file each under lua/ (package data), read once at import.
_SCRIPTS = resources.files("tasks.batch") / "lua"
#: The scripts that use ready() and touch(): lua/ready.lua is prepended to them.
_USE_READY = frozenset({"record_chunk", "mark_published", "finalize"})


def _script(name: str) -> str:
    text = (_SCRIPTS / f"{name}.lua").read_text(encoding="utf-8")
    return _script("ready") + text if name in _USE_READY else text


SCRIPTS = {
    name: _script(name)
    for name in (
        "record_chunk",
        "mark_published",
        "finalize",
        "begin_chunk",
        "cancel",
        "fail_publish",
        "claim_callback",
        "settle_callback",
        "begin_retry",
    )
}


class BatchNotFound(LookupError):
    """No batch with this id (never submitted, or expired)."""


@dataclass(frozen=True)
class Status:
    """What `batch status` reports; times are ISO 8601 UTC or None."""

    id: str
    handler: str
    state: str
    attempt: int
    total: int
    published: bool
    succeeded: int
    failed: int
    skipped: int
    pending: int
    chunk_size: int
    chunks: int | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    elapsed_seconds: float | None
    items_per_second: float | None
    result: Any
    error: str | None = None  # why publishing failed (state publish_failed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchStore:
    """Reads and writes one Redis database's batches; every write refreshes the expiry."""

    def __init__(self, client: redis.Redis, *, expires: int) -> None:
        self.redis = client
        self.expires = int(expires)
        script = {name: client.register_script(text) for name, text in SCRIPTS.items()}
        self._record_chunk = script["record_chunk"]
        self._mark_published = script["mark_published"]
        self._finalize = script["finalize"]
        self._begin_chunk = script["begin_chunk"]
        self._cancel = script["cancel"]
        self._begin_retry = script["begin_retry"]
        self._fail_publish = script["fail_publish"]
        self._claim_callback = script["claim_callback"]
        self._settle_callback = script["settle_callback"]

    @staticmethod
    def key(batch_id: str, part: str = "") -> str:
        return f"{PREFIX}{batch_id}{':' + part if part else ''}"

    # --- producer side -------------------------------------------------------------------
    def create(
        self,
        batch_id: str,
        *,
        handler: str,
        options: Mapping[str, Any],
        chunk_size: int,
        source: str,
        callback: str | None,
    ) -> None:
        record: dict[Any, Any] = {
            "handler": handler,
            "options": json.dumps(dict(options)),
            "chunk_size": chunk_size,
            "source": source,
            "attempt": 1,
            "total": 0,
            "processed": 0,
            "succeeded": 0,
            "failed": 0,
            "skipped": 0,
            "created_at": repr(time.time()),
        }
        if callback:
            record["callback"] = callback
        key = self.key(batch_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=record)
            pipe.expire(key, self.expires)
            pipe.zadd(INDEX, {batch_id: float(record["created_at"])})
            pipe.execute()
        # Batches expire about in creation order, so the oldest entries are the stale ones:
        # one page per submit keeps the index about as long as the batches kept.
        self.prune_index(pages=1)

    def mark_published(self, batch_id: str, attempt: int, total: int, chunks: int) -> bool:
        """Record that every chunk of `attempt` is published; True if it is ready to finalize."""
        args = [attempt, total, chunks, self.expires]
        return bool(self._mark_published(keys=[self.key(batch_id)], args=args))

    def note_published(self, batch_id: str, total: int) -> None:
        """Show how many items are published so far, while the producer is still going."""
        self.redis.hset(self.key(batch_id), "total", total)

    def fail_publish(
        self, batch_id: str, attempt: int, reason: str, total: int | None = None
    ) -> bool:
        """End an attempt whose publishing raised (state publish_failed, the reason in `error`);
        False if the batch had already finished. `total`: the items published before it."""
        args: list[str | int] = [attempt, reason, repr(time.time()), self.expires]
        args.append("" if total is None else total)
        done = int(self._fail_publish(keys=[self.key(batch_id)], args=args))
        if done < 0:
            raise BatchNotFound(batch_id)
        return done == 1

    def cancelled(self, batch_id: str) -> bool:
        return bool(self.redis.hexists(self.key(batch_id), "cancelled"))

    def cancel(self, batch_id: str) -> bool:
        """Cancel a batch that has not finished; False if it had already finished."""
        done = int(self._cancel(keys=[self.key(batch_id)], args=[repr(time.time()), self.expires]))
        if done < 0:
            raise BatchNotFound(batch_id)
        return done == 1

    def begin_retry(self, batch_id: str, *, include_input_errors: bool = False) -> tuple[int, str]:
        """Open the next attempt; returns (attempt, key of the items to re-run). Input errors
        stay failed (`stays_failed`); ValueError if nothing is left to re-run."""
        key = self.key(batch_id)
        state = self.redis.hget(key, "state")
        if state is None and not self.redis.exists(key):
            raise BatchNotFound(batch_id)
        keys = [key, self.key(batch_id, "failures")]
        if not self.redis.exists(keys[1]):
            # RENAME needs a source; no failures means nothing to retry.
            raise ValueError(f"batch {batch_id} has no failed items to retry")
        kept: list[str] = []
        if state == "completed_with_failures":
            kept = self._kept_failed(keys[1], include_input_errors)
        attempt, detail = self._begin_retry(keys=keys, args=[self.expires, *kept])
        if int(attempt) == 0:
            raise ValueError(str(detail))
        return int(attempt), str(detail)

    def _kept_failed(self, failures: str, include_input_errors: bool) -> list[str]:
        """The indices of the failed items a retry leaves failed; ValueError if that is all."""
        kept, total = [], 0
        for index, raw in self.iter_hash(failures):
            total += 1
            if stays_failed(json.loads(raw), include_input_errors=include_input_errors):
                kept.append(index)
        if len(kept) == total:
            hint = (
                ""
                if include_input_errors
                else "; to re-run the invalid ones: --include-input-errors"
            )
            raise ValueError(
                f"nothing to retry: all {total} failed item(s) are input errors, which fail "
                f"the same way again{hint}"
            )
        return kept

    def iter_hash(self, key: str) -> Iterator[tuple[str, str]]:
        """Stream a hash in pages (HSCAN), never the whole of it at once."""
        yield from self.redis.hscan_iter(key, count=500)

    # --- worker side ---------------------------------------------------------------------
    def begin_chunk(self, batch_id: str) -> tuple[bool, str, dict[str, Any]]:
        """Note the batch's start; returns (cancelled, handler name, handler options)."""
        cancelled, handler, options = self._begin_chunk(
            keys=[self.key(batch_id)], args=[repr(time.time())]
        )
        if not handler:
            raise BatchNotFound(batch_id)
        return bool(int(cancelled)), str(handler), json.loads(options)

    def record_chunk(
        self,
        batch_id: str,
        field: str,
        *,
        succeeded: int,
        failed: int,
        skipped: int = 0,
        partial: Any = None,
        failures: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> tuple[bool, bool]:
        """Count a chunk's outcome once: returns (counted now, batch ready to finalize)."""
        keys = [self.key(batch_id, part) for part in ("", "done", "partials", "failures")]
        args: list[str | int] = [
            field,
            succeeded,
            failed,
            skipped,
            "" if partial is None else json.dumps(partial),
            self.expires,
        ]
        for index, failure in (failures or {}).items():
            args += [index, json.dumps(failure)]
        counted, ready = self._record_chunk(keys=keys, args=args)
        return bool(counted), bool(ready)

    def iter_values(self, key: str) -> Iterator[Any]:
        """The JSON values of a hash, a page at a time."""
        for _field, value in self.iter_hash(key):
            yield json.loads(value)

    def iter_partials(self, batch_id: str) -> Iterator[Any]:
        for _field, value in self.iter_hash(self.key(batch_id, "partials")):
            yield json.loads(value)

    def finalize(self, batch_id: str, attempt: int, state: str, result: Any) -> bool:
        """Store the result and final state; True only for the one call that did it."""
        keys = [self.key(batch_id), self.key(batch_id, "result")]
        args: list[Any] = [attempt, state, json.dumps(result), repr(time.time()), self.expires]
        return bool(self._finalize(keys=keys, args=args))

    def claim_callback(
        self, batch_id: str, attempt: int, token: str, lease: float
    ) -> tuple[str, float]:
        """Claim the sending of an attempt's callback for `lease` seconds. Returns ("claimed",
        0), ("sent", 0), or ("held", seconds until the other run's lease ends)."""
        field = f"callback_sent:{attempt}"
        args: list[str | int] = [field, token, int(lease * 1000), self.expires]
        outcome, wait_ms = self._claim_callback(keys=[self.key(batch_id)], args=args)
        return {0: "held", 1: "claimed", 2: "sent"}[int(outcome)], int(wait_ms) / 1000

    def settle_callback(self, batch_id: str, attempt: int, token: str, *, sent: bool) -> bool:
        """Mark the claimed callback sent, or release the claim; False if the claim was lost
        (its lease ended and another run took it over)."""
        args = [f"callback_sent:{attempt}", token, "sent" if sent else "", self.expires]
        return bool(self._settle_callback(keys=[self.key(batch_id)], args=args))

    # --- readers -------------------------------------------------------------------------
    def meta(self, batch_id: str) -> dict[str, str]:
        meta = cast(dict[str, str], self.redis.hgetall(self.key(batch_id)))
        if not meta:
            raise BatchNotFound(batch_id)
        return meta

    def status(self, batch_id: str) -> Status:
        meta = self.meta(batch_id)
        raw: str | None = None
        if meta.get("state") in ("completed", "completed_with_failures"):
            raw = cast(str | None, self.redis.get(self.key(batch_id, "result")))
        return _status(batch_id, meta, raw)

    # --- the index -----------------------------------------------------------------------
    def _missing(self, batch_ids: list[str]) -> list[str]:
        """The ids among `batch_ids` whose record has expired."""
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.exists(self.key(batch_id))
            found = pipe.execute()
        return [batch_id for batch_id, there in zip(batch_ids, found, strict=True) if not there]

    def prune_index(self, *, pages: int | None = None) -> int:
        """Remove the index entries whose batch has expired, oldest first, at most `pages`
        pages of entries (None: the whole index); returns how many it removed."""
        removed = start = page = 0
        while pages is None or page < pages:
            ids = cast(list[str], self.redis.zrange(INDEX, start, start + _PRUNE_PAGE - 1))
            if not ids:
                break
            stale = self._missing(ids)
            if stale:
                self.redis.zrem(INDEX, *stale)
            removed += len(stale)
            start += len(ids) - len(stale)
            page += 1
        return removed

    def count(self) -> int:
        """How many batches are kept, in any state."""
        self.prune_index()
        return int(self.redis.zcard(INDEX))

    def _page(self, start: int, size: int) -> list[tuple[str, dict[str, str]]]:
        """Index entries start..start+size-1, newest first, with their records ({}: gone)."""
        ids = cast(list[str], self.redis.zrevrange(INDEX, start, start + size - 1))
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.key(batch_id))
            metas = pipe.execute()
        return list(zip(ids, metas, strict=True))

    def _with_results(self, found: list[tuple[str, dict[str, str]]]) -> list[Status]:
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id, _meta in found:
                pipe.get(self.key(batch_id, "result"))
            raws = pipe.execute()
        return [_status(i, meta, raw) for (i, meta), raw in zip(found, raws, strict=True)]

    def statuses(
        self, *, limit: int = 50, offset: int = 0, state: str | None = None
    ) -> list[Status]:
        """Kept batches, newest first: `limit` of them after skipping `offset` (counting only
        batches in `state` when it is given). Reads the index a page at a time."""
        found: list[tuple[str, dict[str, str]]] = []
        start, skip = 0, offset
        size = limit + offset if state is None else 500
        while len(found) < limit:
            page = self._page(start, max(size, 1))
            if not page:
                break
            gone = [batch_id for batch_id, meta in page if not meta]
            if gone:  # expired since they were indexed
                self.redis.zrem(INDEX, *gone)
            start += len(page) - len(gone)
            kept = [(i, m) for i, m in page if m and state in (None, _state(m))]
            used = min(skip, len(kept))
            skip -= used
            found += kept[used : used + limit - len(found)]
        return self._with_results(found)

    def failures(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The failed items of the current attempt, in no particular order."""
        self.meta(batch_id)
        for _index, value in self.iter_hash(self.key(batch_id, "failures")):
            yield json.loads(value)

    def failure_count(self, batch_id: str) -> int:
        """How many items of the current attempt failed (and are kept for a retry)."""
        self.meta(batch_id)
        return int(self.redis.hlen(self.key(batch_id, "failures")))

    def failure_page(
        self, batch_id: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The failed items of the current attempt by item index, `limit` from `offset`."""
        self.meta(batch_id)
        key = self.key(batch_id, "failures")
        indices = sorted(int(index) for index in self.redis.hkeys(key))
        wanted = indices[offset : None if limit is None else offset + limit]
        page: list[dict[str, Any]] = []
        for start in range(0, len(wanted), 1000):
            values = self.redis.hmget(key, [str(i) for i in wanted[start : start + 1000]])
            page += [json.loads(value) for value in values if value is not None]
        return page


def stays_failed(failure: Mapping[str, Any], *, include_input_errors: bool = False) -> bool:
    """Whether a retry leaves a failed item failed: a row the producer could not read always
    (it is read the same way again), an item the handler refused as invalid unless
    `include_input_errors`. Records written before ``kind`` existed mark unreadable rows
    with ``input_error``."""
    kind = failure.get("kind") or ("unreadable" if failure.get("input_error") else "error")
    return kind == "unreadable" or (kind == "invalid" and not include_input_errors)


def _state(meta: Mapping[str, str]) -> str:
    if "state" in meta:
        return meta["state"]
    return "running" if "started_at" in meta else "pending"


def _status(batch_id: str, meta: Mapping[str, str], raw_result: str | None) -> Status:
    """A batch's Status from its record and, once completed, its stored result."""
    number = {k: int(meta.get(k, 0)) for k in ("total", "succeeded", "failed", "skipped")}
    started, finished = meta.get("started_at"), meta.get("finished_at")
    elapsed = None
    if started is not None:
        elapsed = (float(finished) if finished else time.time()) - float(started)
    done = number["succeeded"] + number["failed"]
    return Status(
        id=batch_id,
        handler=meta["handler"],
        state=_state(meta),
        attempt=int(meta["attempt"]),
        published=meta.get("published") == meta["attempt"],
        pending=max(0, number["total"] - done - number["skipped"]),
        chunk_size=int(meta["chunk_size"]),
        chunks=int(meta["chunks"]) if "chunks" in meta else None,
        created_at=iso(meta.get("created_at")),
        started_at=iso(started),
        finished_at=iso(finished),
        elapsed_seconds=None if elapsed is None else round(elapsed, 3),
        items_per_second=round(done / elapsed, 1) if elapsed else None,
        result=json.loads(raw_result) if raw_result else None,
        error=meta.get("error"),
        **number,
    )


def store_for(app: Celery) -> BatchStore:
    """The store of an app's configuration (conveyor_batch_redis_url, else the result backend)."""
    conf = app.conf
    url = conf.get("conveyor_batch_redis_url") or conf.result_backend
    return BatchStore(
        redis_client(str(url)), expires=int(conf.get("conveyor_batch_expires", 604800))
    )
