"""Batch progress as Prometheus metrics and as an overview section, read from a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from tasks.batch import monitoring, runner
from tasks.batch.store import BatchStore


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
    running_and_finished(monitoring.store_for(app))
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
    running_and_finished(monitoring.store_for(app))
    title, rows = monitoring.overview_section(app)
    assert title == "batches"
    assert [(row["batch"], row["done"], row["failed"]) for row in rows] == [("run-1", "2/4", 1)]
