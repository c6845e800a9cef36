"""Queue figures read from RabbitMQ at each scrape, and the exporter's registry."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from celery import Celery
from kombu.utils.imports import symbol_by_name
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from monitoring import queue_stats
from monitoring.exporter.events import TaskEvents, configured_queues

logger = logging.getLogger(__name__)


#: Gauges of each broker node (management API only): name, NodeStats field, help. Limits are
#: `_limit`, not `_total`, a suffix Prometheus keeps for counters.
NODE_GAUGES = (
    ("conveyor_broker_file_descriptors_used", "fd_used", "File handles the node has open."),
    ("conveyor_broker_file_descriptors_limit", "fd_total", "The node's open-file limit."),
    ("conveyor_broker_sockets_used", "sockets_used", "Sockets (connections) the node has open."),
    ("conveyor_broker_sockets_limit", "sockets_total", "Sockets the node accepts, at most."),
)


class BrokerCollector(Collector):
    """Queue figures read from RabbitMQ at each scrape."""

    def __init__(self, app: Celery, events: TaskEvents | None, api_url: str | None) -> None:
        self.app = app
        self.events = events
        self.api_url = api_url

    def collect(self) -> Iterator[Metric]:
        yield from self._nodes()
        up = GaugeMetricFamily("conveyor_broker_up", "1 when the last queue read succeeded.")
        ready = GaugeMetricFamily(
            "conveyor_queue_messages_ready", "Messages waiting for a consumer.", labels=["queue"]
        )
        unacked = GaugeMetricFamily(
            "conveyor_queue_messages_unacked",
            "Messages delivered to a worker and not yet acknowledged (management API only).",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "conveyor_queue_consumers", "Consumers (worker processes' channels).", labels=["queue"]
        )
        dead = GaugeMetricFamily(
            "conveyor_dead_letter_messages", "Messages in the dead-letter queue."
        )
        delayed = GaugeMetricFamily(
            "conveyor_delayed_messages",
            "Countdown/ETA messages held in celery_delayed_* (management API only).",
        )
        observed_at = time.time()
        try:
            snap = queue_stats.snapshot(self.app, self.api_url)
        except Exception as exc:
            logger.warning("reading queue figures failed: %r", exc)
            up.add_metric([], 0)
            yield up
            yield from self._waiting(observed_at)
            return
        up.add_metric([], 1)
        self._add_queues(snap, observed_at, ready, consumers, unacked, dead)
        if snap.delayed is not None:
            delayed.add_metric([], snap.delayed)
        yield from (up, ready, consumers, dead)
        if snap.source == "management":
            yield from (unacked, delayed)
        yield from self._waiting(observed_at)

    def _add_queues(
        self,
        snap: queue_stats.BrokerSnapshot,
        observed_at: float,
        ready: GaugeMetricFamily,
        consumers: GaugeMetricFamily,
        unacked: GaugeMetricFamily,
        dead: GaugeMetricFamily,
    ) -> None:
        dlq = self.app.conf.conveyor_dead_letter_queue
        for name, stats in snap.queues.items():
            ready.add_metric([name], stats.ready)
            consumers.add_metric([name], stats.consumers)
            if stats.unacked is not None:
                unacked.add_metric([name], stats.unacked)
            if name == dlq:
                dead.add_metric([], stats.ready + (stats.unacked or 0))
            elif stats.ready == 0 and self.events is not None:
                self.events.nothing_ready_in(name, observed_at)

    def _nodes(self) -> Iterable[Metric]:
        """Each broker node's file handles and sockets, read apart from the queues: at its
        open-file limit the broker may refuse AMQP connections and still answer HTTP."""
        try:
            nodes = queue_stats.broker_nodes(self.app, self.api_url)
        except Exception as exc:
            logger.warning("reading broker nodes failed: %r", exc)
            return
        if nodes is None:
            return
        for name, field, what in NODE_GAUGES:
            gauge = GaugeMetricFamily(name, what, labels=["node"])
            for node in nodes:
                gauge.add_metric([node.node], getattr(node, field))
            yield gauge

    def _waiting(self, now: float) -> Iterable[Metric]:
        if self.events is None:
            return
        count = GaugeMetricFamily(
            "conveyor_tasks_waiting",
            "Tasks sent and due but not yet started, by queue (from events).",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "conveyor_oldest_waiting_task_age_seconds",
            "Age of the oldest task sent and due but not yet started, by queue (from events).",
            labels=["queue"],
        )
        waiting = self.events.waiting_by_queue(now)
        for name in queue_stats.monitored_queues(self.app):
            tasks, age = waiting.get(name, (0, 0.0))
            count.add_metric([name], tasks)
            oldest.add_metric([name], age)
        yield count
        yield oldest

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only; nothing to read at registration


def build_registry(
    app: Celery, api_url: str | None, *, with_events: bool = True
) -> tuple[CollectorRegistry, TaskEvents | None]:
    """The exporter's registry: broker figures, event figures and the configured extensions."""
    registry = CollectorRegistry()
    events = TaskEvents(registry, queues=configured_queues(app.conf)) if with_events else None
    registry.register(BrokerCollector(app, events, api_url))
    for path in app.conf.get("conveyor_metrics_collectors") or ():
        registry.register(symbol_by_name(path)(app))
    return registry, events
