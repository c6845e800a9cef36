"""The outbox's backlog for the metrics exporter and `celery -A tasks overview`.

Registered by celeryconfig in ``conveyor_metrics_collectors`` and ``conveyor_overview_sections``
only when CONVEYOR_OUTBOX_URL is set. Both read conveyor_outbox (waiting rows by queue and the
oldest one's age) and the relays' counters (conveyor_outbox_counters) at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BACKLOG = """
SELECT queue, count(*), extract(epoch FROM clock_timestamp() - min(created_at))
FROM conveyor_outbox WHERE published_at IS NULL GROUP BY queue ORDER BY queue
"""
COUNTERS = "SELECT name, value FROM conveyor_outbox_counters"


@dataclass(frozen=True)
class Backlog:
    queue: str
    waiting: int
    oldest_seconds: float


def read(url: str) -> tuple[list[Backlog], dict[str, int]]:
    """Waiting rows per queue, and the relays' counters ('published:<queue>', ...)."""
    with psycopg.connect(url, connect_timeout=5) as db:
        backlog = [Backlog(q, int(n), float(age)) for q, n, age in db.execute(BACKLOG)]
        counters = {name: int(value) for name, value in db.execute(COUNTERS)}
    return backlog, counters


class OutboxCollector(Collector):
    """Rows waiting and the oldest one's age; rows published and failed publishes by queue."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        backlog, counters = read(self.app.conf.conveyor_outbox_url)
        waiting = GaugeMetricFamily(
            "conveyor_outbox_waiting_rows", "Committed outbox rows not published yet."
        )
        waiting.add_metric([], sum(b.waiting for b in backlog))
        yield waiting
        oldest = GaugeMetricFamily(
            "conveyor_outbox_oldest_waiting_seconds",
            "Age of the oldest waiting outbox row; 0 when none waits.",
        )
        oldest.add_metric([], max((b.oldest_seconds for b in backlog), default=0.0))
        yield oldest
        for kind, help_text in (
            ("published", "Outbox rows the relays published (confirmed by the broker)."),
            ("failures", "Failed publish attempts of the relays (broker or database away)."),
        ):
            family = CounterMetricFamily(f"conveyor_outbox_{kind}", help_text, labels=["queue"])
            for name, value in sorted(counters.items()):
                prefix, _, queue = name.partition(":")
                if prefix == kind:
                    family.add_metric([queue], value)
            yield family

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only


def collector(app: Any) -> OutboxCollector:
    return OutboxCollector(app)


def overview_section(app: Any) -> tuple[str, list[dict[str, Any]]]:
    """Queues with waiting outbox rows, for `celery -A tasks overview`."""
    backlog, _ = read(app.conf.conveyor_outbox_url)
    rows = [
        {"queue": b.queue, "waiting": b.waiting, "oldest (s)": round(b.oldest_seconds, 1)}
        for b in backlog
    ]
    return "outbox", rows
