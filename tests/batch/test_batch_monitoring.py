"""Batch progress as Prometheus metrics and as an overview section, read from a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from monitoring import batch as monitoring
from tasks.batch import runner
from tasks.batch.store import BatchStore, store_for


@pytest.fixture
def app(redis_url: str) -> Iterator[SimpleNamespace]:
    client = redis.Redis.from_url(f"{redis_url}/4")
    client.flushdb()
    conf = SimpleNamespace(
        conveyor_batch_redis_url=f"{redis_url}/4",
        conveyor_batch_expires=3600,
        result_backend=f"{redis_url}/0",
    )
    conf.get = lambda key, default=None: getattr(conf, key, default)  # type: ignore[attr-defined]
    yield SimpleNamespace(conf=conf)
    client.close()


def running_and_finished(store: BatchStore) -> None:
    for batch_id, total in (("run-1", 4), ("done-1", 1)):
        store.create(
            batch_id, handler="aggregate", options={}, chunk_size=2, source="t", callback=None
        )
        store.mark_published(batch_id, 1, total, (total + 1) // 2)
    runner.run_chunk(
        store, "run-1", 1, 0, 0, [{"key": "a", "value": "1"}, {"key": "a", "value": "x"}]
    )
    runner.run_chunk(store, "done-1", 1, 0, 0, [{"key": "b", "value": "2"}])
    runner.run_finalize(store, "done-1", 1, lambda name, task_id: None)


def test_unfinished_batches_are_exported_item_by_outcome(app: SimpleNamespace) -> None:
    running_and_finished(store_for(app))
    registry = CollectorRegistry()
    registry.register(monitoring.collector(app))
    text = generate_latest(registry).decode()

    assert 'conveyor_batches{state="running"} 1.0' in text
    assert 'conveyor_batches{state="completed"} 1.0' in text
    assert (
        'conveyor_batch_items{batch_id="run-1",handler="aggregate",outcome="succeeded"} 1.0' in text
    )
    assert 'conveyor_batch_items{batch_id="run-1",handler="aggregate",outcome="failed"} 1.0' in text
    assert (
        'conveyor_batch_items{batch_id="run-1",handler="aggregate",outcome="pending"} 2.0' in text
    )
    assert 'batch_id="done-1"' not in text


def test_the_overview_lists_unfinished_batches_only(app: SimpleNamespace) -> None:
    running_and_finished(store_for(app))
    title, rows = monitoring.overview_section(app)
    assert title == "batches"
    assert [(row["batch"], row["done"], row["failed"]) for row in rows] == [("run-1", "2/4", 1)]


def _scans(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


def test_a_scrape_reads_the_batch_index_and_never_scans_the_keyspace(
    app: SimpleNamespace, redis_url: str
) -> None:
    store = store_for(app)
    running_and_finished(store)
    for n in range(300):  # unrelated keys a scan would have had to walk
        store.redis.set(f"other:{n}", "x")
    before = _scans(store.redis)

    registry = CollectorRegistry()
    registry.register(monitoring.collector(app))
    text = generate_latest(registry).decode()
    monitoring.overview_section(app)

    assert _scans(store.redis) == before
    assert 'conveyor_batches{state="running"} 1.0' in text


def test_a_batch_leaves_the_index_once_it_has_expired(app: SimpleNamespace) -> None:
    store = store_for(app)
    running_and_finished(store)
    store.redis.delete(store.key("done-1"))  # as its expiry would

    assert [s.id for s in monitoring.batch_statuses(app)] == ["run-1"]
    assert store.redis.zrange("conveyor:batches", 0, -1) == ["run-1"]
