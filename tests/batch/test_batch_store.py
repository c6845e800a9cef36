"""Batch state in a real (private) Redis: counting once, finalizing once, expiry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from tasks.batch import chunking, handlers, runner
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


def _complete(store: BatchStore, batch_id: str) -> None:
    """A one-chunk batch with a callback, counted and ready to finalize."""
    store.create(batch_id, handler="aggregate", options={}, chunk_size=2, source="t",
                 callback="cb")  # fmt: skip
    store.mark_published(batch_id, 1, 2, 1)
    outcome = runner.run_chunk(store, batch_id, 1, 0, 0, [{"key": "a", "value": "1"}] * 2)
    assert outcome.ready


def test_two_finalize_runs_at_the_same_time_send_the_callback_once(store: BatchStore) -> None:
    # Given complete batches, each finalized by two threads at once (as when the last chunk
    # and its redelivery run in two pool processes), sending being slow enough to overlap
    sent: list[str] = []
    waiting: list[float] = []
    states: list[str] = []

    def send(name: str, task_id: str) -> None:
        time.sleep(0.2)
        sent.append(task_id)

    def finalize(batch_id: str, start: threading.Barrier) -> None:
        start.wait(5)
        try:
            states.append(runner.run_finalize(store, batch_id, 1, send))
        except runner.CallbackInProgress as exc:
            waiting.append(exc.retry_in)

    batch_ids = [f"race-{n}" for n in range(5)]
    for batch_id in batch_ids:
        _complete(store, batch_id)
        start = threading.Barrier(2)
        threads = [threading.Thread(target=finalize, args=(batch_id, start)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)

    # Then each batch's callback was sent once; the other run was told to come back later
    assert sorted(sent) == sorted(f"{batch_id}.callback.1" for batch_id in batch_ids)
    assert states == ["completed"] * 5
    assert len(waiting) == 5 and all(0 < wait <= 60 for wait in waiting)
    # And when it does, it finds the callback sent and sends nothing
    for batch_id in batch_ids:
        assert runner.run_finalize(store, batch_id, 1, send) == "completed"
        assert store.meta(batch_id)["callback_sent:1"] == "sent"
        assert store.status(batch_id).result["a"]["count"] == 2
    assert len(sent) == 5


def test_only_one_of_concurrent_finalize_calls_stores_the_result(store: BatchStore) -> None:
    _complete(store, "b3")
    start = threading.Barrier(8)
    won: list[bool] = []

    def finalize(n: int) -> None:
        start.wait(5)
        won.append(store.finalize("b3", 1, "completed", {"run": n}))

    threads = [threading.Thread(target=finalize, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(won) == [False] * 7 + [True]
    assert list(store.status("b3").result) == ["run"]


def test_a_callback_claimed_by_a_run_that_died_is_sent_once_its_lease_ends(
    store: BatchStore,
) -> None:
    # Given a finalize run that claimed the callback and died before sending it
    _complete(store, "b4")
    store.finalize("b4", 1, "completed", {})
    assert store.claim_callback("b4", 1, "dead-run", lease=0.5)[0] == "claimed"
    sent: list[str] = []

    # Then a redelivered finalize waits while the lease lasts ...
    with pytest.raises(runner.CallbackInProgress) as held:
        runner.run_finalize(store, "b4", 1, lambda name, task_id: sent.append(task_id))
    assert 0 < held.value.retry_in <= 0.5
    assert sent == []

    # ... and takes the claim over after it, sending with the callback's own task id
    time.sleep(held.value.retry_in + 0.05)
    runner.run_finalize(store, "b4", 1, lambda name, task_id: sent.append(task_id))
    runner.run_finalize(store, "b4", 1, lambda name, task_id: sent.append(task_id))
    assert sent == ["b4.callback.1"]
    # The dead run's claim is gone: it could not mark anything any more
    assert store.settle_callback("b4", 1, "dead-run", sent=True) is False


def test_a_callback_whose_send_raised_is_sent_by_the_next_run(store: BatchStore) -> None:
    _complete(store, "b5")

    def broker_down(name: str, task_id: str) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        runner.run_finalize(store, "b5", 1, broker_down)
    sent: list[str] = []
    assert runner.run_finalize(store, "b5", 1, lambda n, t: sent.append(t)) == "completed"
    assert sent == ["b5.callback.1"]


#: Keys each item index was processed with, by the handler below (one process: the test's).
KEYS_SEEN: dict[str, list[str]] = {}


@handlers.register("tests.records_keys")
class RecordsKeys(handlers.Handler):
    """Rejects items marked "bad" until `fixed` is set; records every key it is given."""

    fixed = False

    def process(self, item: Any, key: str) -> Any:
        KEYS_SEEN.setdefault(item["name"], []).append(key)
        if item.get("bad") and not RecordsKeys.fixed:
            raise handlers.ItemError("rejected")
        return None


def test_the_idempotency_key_is_the_same_on_redelivery_and_on_the_retry_attempt(
    store: BatchStore,
) -> None:
    # Given a batch of two chunks whose items 1 and 3 fail
    KEYS_SEEN.clear()
    RecordsKeys.fixed = False
    store.create("b6", handler="tests.records_keys", options={}, chunk_size=2, source="t",
                 callback=None)  # fmt: skip
    store.mark_published("b6", 1, 4, 2)
    items = [{"name": f"i{n}", "bad": n % 2 == 1} for n in range(4)]
    runner.run_chunk(store, "b6", 1, 0, 0, items[:2])
    runner.run_chunk(store, "b6", 1, 0, 0, items[:2])  # redelivered
    runner.run_chunk(store, "b6", 1, 1, 2, items[2:])
    assert runner.run_finalize(store, "b6", 1, lambda *a: None) == "completed_with_failures"

    # When the failed items are retried as attempt 2, by the chunks api.retry publishes
    RecordsKeys.fixed = True
    attempt, retrying = store.begin_retry("b6")
    chunks = list(chunking.retry_chunks(store.iter_values(retrying), 2))
    assert attempt == 2 and len(chunks) == 1
    store.mark_published("b6", 2, 4, 1)
    start, chunk_items, extras = chunks[0]
    runner.run_chunk(store, "b6", 2, 0, start, chunk_items, extras)
    assert runner.run_finalize(store, "b6", 2, lambda *a: None) == "completed"

    # Then every run of an item, first, redelivered or retried, had the same key
    assert KEYS_SEEN == {
        "i0": ["b6:0", "b6:0"],
        "i1": ["b6:1", "b6:1", "b6:1"],
        "i2": ["b6:2"],
        "i3": ["b6:3", "b6:3"],
    }


def _submitted(store: BatchStore, batch_id: str, failures: int = 0) -> None:
    store.create(batch_id, handler="aggregate", options={}, chunk_size=2, source="t", callback=None)
    store.mark_published(batch_id, 1, failures or 1, 1)
    items = [{"key": "a", "value": "bad"}] * failures or [{"key": "a", "value": "1"}]
    runner.run_chunk(store, batch_id, 1, 0, 0, items)


def test_batches_are_listed_newest_first_in_pages_and_by_state(store: BatchStore) -> None:
    for n in range(5):
        _submitted(store, f"b{n}", failures=n % 2)
    store.create("fresh", handler="noop", options={}, chunk_size=2, source="t", callback=None)

    assert [s.id for s in store.statuses(limit=3)] == ["fresh", "b4", "b3"]
    assert [s.id for s in store.statuses(limit=3, offset=4)] == ["b1", "b0"]
    failed = store.statuses(state="running")  # not finalized: counted, some failed
    assert [s.id for s in failed] == ["b4", "b3", "b2", "b1", "b0"]
    assert [s.id for s in store.statuses(state="pending")] == ["fresh"]
    assert [s.id for s in store.statuses(state="running", offset=1, limit=2)] == ["b3", "b2"]
    assert store.count() == 6

    store.redis.delete(store.key("b2"), store.key("b4"))  # as their expiry would
    assert store.count() == 4
    assert [s.id for s in store.statuses(limit=10)] == ["fresh", "b3", "b1", "b0"]


def test_submitting_prunes_expired_entries_so_the_index_stays_bounded(store: BatchStore) -> None:
    for n in range(50):
        _submitted(store, f"old{n}")
        store.redis.delete(store.key(f"old{n}"))
    _submitted(store, "new")
    assert store.redis.zcard("conveyor:batches") == 1


def test_failures_are_paged_by_item_index_with_their_total(store: BatchStore) -> None:
    store.create("f", handler="aggregate", options={}, chunk_size=2, source="t", callback=None)
    store.mark_published("f", 1, 30, 3)
    bad = [{"key": "a", "value": "x"}] * 10
    for chunk in (2, 0, 1):
        runner.run_chunk(store, "f", 1, chunk, chunk * 10, bad)

    assert store.failure_count("f") == 30
    page = store.failure_page("f", limit=5, offset=8)
    assert [f["index"] for f in page] == [8, 9, 10, 11, 12]
    assert len(store.failure_page("f")) == 30
    assert [f["index"] for f in store.failure_page("f", limit=50, offset=28)] == [28, 29]
