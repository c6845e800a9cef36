"""Batch progress for the metrics exporter and `celery -A tasks overview`.

Registered in celeryconfig through ``conveyor_metrics_collectors`` and
``conveyor_overview_sections``; both read the batch records in Redis (tasks/batch/store.py) at
scrape time through the batch index, nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.batch.api import list_batches
from tasks.batch.store import FINAL_STATES, Status

#: Batches read per scrape (the newest): a bound on the scrape's cost and label cardinality.
MAX_BATCHES = 500


def batch_statuses(app: Celery, limit: int = MAX_BATCHES) -> list[Status]:
    """The newest batches still kept in Redis (finished ones until they expire), newest last.

    Read from the batch index (a sorted set), never by scanning the keyspace."""
    return list(reversed(list_batches(app=app, limit=limit)))


class BatchCollector(Collector):
    """Batches by state, and item progress of every batch not finished yet."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        statuses = batch_statuses(self.app)
        by_state = GaugeMetricFamily(
            "conveyor_batches", "Batches kept in Redis, by state.", labels=["state"]
        )
        counts = Counter(s.state for s in statuses)
        for state in ("pending", "running", *sorted(FINAL_STATES)):
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state

        items = GaugeMetricFamily(
            "conveyor_batch_items",
            "Items of each unfinished batch, by outcome so far.",
            labels=["batch_id", "handler", "outcome"],
        )
        rate = GaugeMetricFamily(
            "conveyor_batch_items_per_second",
            "Items finished per second since each unfinished batch started.",
            labels=["batch_id", "handler"],
        )
        for s in statuses:
            if s.state in FINAL_STATES:
                continue
            for outcome in ("succeeded", "failed", "skipped", "pending"):
                items.add_metric([s.id, s.handler, outcome], getattr(s, outcome))
            rate.add_metric([s.id, s.handler], s.items_per_second or 0.0)
        yield items
        yield rate

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only


def collector(app: Celery) -> BatchCollector:
    return BatchCollector(app)


def overview_section(app: Celery) -> tuple[str, list[dict[str, Any]]]:
    """Unfinished batches for `celery -A tasks overview`."""
    rows = [
        {
            "batch": s.id,
            "handler": s.handler,
            "state": s.state,
            "done": f"{s.succeeded + s.failed}/{s.total}",
            "failed": s.failed,
            "items/s": s.items_per_second,
        }
        for s in batch_statuses(app)
        if s.state not in FINAL_STATES
    ]
    return "batches", rows
