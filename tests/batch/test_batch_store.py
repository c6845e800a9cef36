"""Batch state in a real (private) Redis: counting once, finalizing once, expiry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from tasks.batch import handlers, runner
from tasks.batch.store import BatchStore


@pytest.fixture
def store(redis_url: str) -> Iterator[BatchStore]:
    client = redis.Redis.from_url(f"{redis_url}/3", decode_responses=True)
    client.flushdb()
    yield BatchStore(client, expires=3600)
    client.close()


def _batch(store: BatchStore, total: int, chunks: int) -> str:
    store.create("b1", handler="aggregate", options={}, chunk_size=2, source="t", callback="cb")
    store.mark_published("b1", 1, total, chunks)
    return "b1"


def test_a_chunk_run_twice_is_counted_once(store: BatchStore) -> None:
    batch_id = _batch(store, total=4, chunks=2)
    items = [{"key": "a", "value": "1"}, {"key": "a", "value": "oops"}]

    first = runner.run_chunk(store, batch_id, 1, 0, 0, items)
    again = runner.run_chunk(store, batch_id, 1, 0, 0, items)

    assert (first.counted, again.counted) == (True, False)
    status = store.status(batch_id)
    assert (status.succeeded, status.failed, status.pending) == (1, 1, 2)
    assert not first.ready and not again.ready


def test_the_last_chunk_and_its_redelivery_both_see_ready_but_finalize_happens_once(
    store: BatchStore,
) -> None:
    batch_id = _batch(store, total=2, chunks=2)
    runner.run_chunk(store, batch_id, 1, 0, 0, [{"key": "a", "value": "1"}])
    last = runner.run_chunk(store, batch_id, 1, 1, 1, [{"key": "a", "value": "2"}])
    redelivered = runner.run_chunk(store, batch_id, 1, 1, 1, [{"key": "a", "value": "2"}])
    assert last.ready and redelivered.ready

    sent: list[tuple[str, str]] = []
    states = [
        runner.run_finalize(store, batch_id, 1, lambda name, tid: sent.append((name, tid)))
        for _ in range(3)
    ]

    assert states == ["completed"] * 3
    assert sent == [("cb", "b1.callback.1")]
    assert store.status(batch_id).result["a"]["sum"] == "3"
    # Once finalized, a redelivered chunk no longer asks for a finalize
    assert not runner.run_chunk(store, batch_id, 1, 1, 1, [{"key": "a", "value": "2"}]).ready


def test_a_cancelled_batch_skips_its_chunks_and_is_never_finalized(store: BatchStore) -> None:
    batch_id = _batch(store, total=2, chunks=1)
    assert store.cancel(batch_id) is True
    outcome = runner.run_chunk(store, batch_id, 1, 0, 0, [{"key": "a", "value": "1"}] * 2)
    assert (outcome.skipped, outcome.ready) == (2, False)
    assert store.status(batch_id).state == "cancelled"
    assert runner.run_finalize(store, batch_id, 1, lambda *a: None) == "cancelled"


def test_every_key_of_a_batch_expires(store: BatchStore) -> None:
    batch_id = _batch(store, total=1, chunks=1)
    runner.run_chunk(store, batch_id, 1, 0, 0, ["not a record"])
    runner.run_finalize(store, batch_id, 1, lambda *a: None)
    keys = store.redis.keys(f"conveyor:batch:{batch_id}*")
    assert len(keys) >= 4
    for key in keys:
        assert 0 < store.redis.ttl(key) <= 3600, key


@handlers.register("tests.hits_soft_time_limit")
class HitsSoftTimeLimit(handlers.Handler):
    def process(self, item: Any, key: str) -> Any:
        if item == "slow":
            raise SoftTimeLimitExceeded()
        return None


def test_a_chunk_at_its_soft_time_limit_counts_what_is_done_and_fails_the_rest(
    store: BatchStore,
) -> None:
    store.create("b2", handler="tests.hits_soft_time_limit", options={}, chunk_size=4,
                 source="t", callback=None)  # fmt: skip
    store.mark_published("b2", 1, 4, 1)

    outcome = runner.run_chunk(store, "b2", 1, 0, 0, ["a", "b", "slow", "c"])

    assert (outcome.succeeded, outcome.failed, outcome.ready) == (2, 2, True)
    reasons = {f["index"]: f["error"] for f in store.failures("b2")}
    assert reasons == dict.fromkeys([2, 3], "the chunk reached its soft time limit")
