"""Prometheus exporter for what Flower does not show: `celery -A tasks exporter`.

It is its own process (compose service ``exporter``) and combines two sources:
- the broker, read at every scrape (workers/queue_stats.py): depth (ready, unacked) and
  consumers per task queue, the dead-letter queue and the delayed-delivery queues;
- the Celery event stream, consumed by a thread: how long tasks wait between being sent and
  being started, the oldest task still waiting per queue, retries and failures per task.

Other parts of Conveyor add their own metrics (batch progress, last run per schedule entry)
without touching this module: ``conveyor_metrics_collectors`` lists ``"module:factory"`` paths;
each factory is called with the app and returns a prometheus_client Collector.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click
from celery import Celery
from celery.bin.base import CeleryCommand
from kombu.utils.imports import symbol_by_name
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from workers import queue_stats
from workers.bad_input import REJECTED_EVENT

logger = logging.getLogger(__name__)

#: Waits from a few milliseconds (idle workers) to an hour (a backlog worth paging for).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Tasks remembered between their events. Bounded: a backlog of millions must not grow the
#: exporter without limit; past it the oldest entries are forgotten (and counted).
MAX_TRACKED_TASKS = 100_000
#: Seconds between reconnection attempts of the event consumer.
RECONNECT_INTERVAL = 2.0


def _exception_type(exception: Any) -> str:
    """`ValueError('x')` -> `ValueError`: one label value per type, not per message."""
    text = str(exception or "")
    return text.split("(", 1)[0].strip() or "unknown"


def _timestamp(value: Any) -> float | None:
    if not value:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


@dataclass
class _Waiting:
    name: str
    queue: str
    #: When the task became due: sent time, or its ETA when it has one.
    since: float
    #: When the exporter learned of it, by the exporter's clock.
    seen: float


class TaskEvents:
    """Task counters and waiting times, fed with Celery events (one dict per event)."""

    def __init__(self, registry: CollectorRegistry, max_tracked: int = MAX_TRACKED_TASKS) -> None:
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        self._names: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: Start times of tasks whose task-sent event had not arrived when they started. The
        #: task-sent event goes out after the task's confirm, on another connection, and a
        #: bulk enqueue sends them in lists, so a worker may start a task first.
        self._started_early: OrderedDict[str, float] = OrderedDict()
        self.sent = Counter(
            "conveyor_tasks_sent", "Tasks published, by task and queue.", ["task", "queue"],
            registry=registry,
        )  # fmt: skip
        self.wait = Histogram(
            "conveyor_task_wait_seconds",
            "Time from a task being sent (or due, for countdown/ETA) to a worker starting it.",
            ["task", "queue"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.succeeded = Counter(
            "conveyor_tasks_succeeded", "Tasks that returned, by task.", ["task"],
            registry=registry,
        )  # fmt: skip
        self.failed = Counter(
            "conveyor_tasks_failed",
            "Tasks that raised (after their last retry), by task and exception type.",
            ["task", "exception"],
            registry=registry,
        )
        self.retried = Counter(
            "conveyor_tasks_retried", "Retries scheduled, by task.", ["task"], registry=registry
        )
        self.rejected = Counter(
            "conveyor_tasks_rejected",
            "Tasks a worker rejected after accepting them (a Reject raised by the task, such as "
            "exhausted retries, or a lost pool process), by queue. Bad input refused before it "
            "became a task is conveyor_messages_rejected.",
            ["queue"],
            registry=registry,
        )
        self.messages_rejected = Counter(
            "conveyor_messages_rejected",
            "Messages a worker refused as bad input (undecodable, refused content type, not a "
            "task, unknown task, malformed or invalid fields), by reason and queue.",
            ["reason", "queue"],
            registry=registry,
        )
        self.forgotten = Counter(
            "conveyor_exporter_forgotten_tasks",
            "Tracked tasks dropped because more than the tracking limit were waiting.",
            registry=registry,
        )
        self.connected = Gauge(
            "conveyor_exporter_events_connected",
            "1 while the exporter is consuming the event stream.",
            registry=registry,
        )

    # --- bookkeeping -------------------------------------------------------------------------
    def _remember(self, uuid: str, name: str, queue: str) -> None:
        self._names[uuid] = (name, queue)
        self._names.move_to_end(uuid)
        while len(self._names) > self.max_tracked:
            self._names.popitem(last=False)

    def _identity(self, uuid: str) -> tuple[str, str]:
        return self._names.get(uuid, ("unknown", "unknown"))

    # --- events ----------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        if kind == REJECTED_EVENT:
            reason, queue = str(event.get("reason") or "unknown"), str(event.get("queue") or "-")
            self.messages_rejected.labels(reason, queue).inc()
            return
        uuid = event.get("uuid")
        if not kind.startswith("task-") or not uuid:
            return
        now = time.time()
        with self._lock:
            if kind == "task-sent":
                name = str(event.get("name") or "unknown")
                queue = str(event.get("queue") or event.get("routing_key") or "unknown")
                self._remember(uuid, name, queue)
                self.sent.labels(name, queue).inc()
                sent = float(event.get("timestamp") or now)
                eta = _timestamp(event.get("eta"))
                due = max(sent, eta or sent)
                started_at = self._started_early.pop(uuid, None)
                if started_at is not None:
                    # Already started: record its wait instead of tracking it as waiting.
                    self.wait.labels(name, queue).observe(max(0.0, started_at - due))
                    return
                self._waiting[uuid] = _Waiting(name, queue, due, now)
                self._waiting.move_to_end(uuid)
                while len(self._waiting) > self.max_tracked:
                    self._waiting.popitem(last=False)
                    self.forgotten.inc()
            elif kind == "task-received":
                if uuid not in self._names:
                    delivery = event.get("routing_key") or "unknown"
                    self._remember(uuid, str(event.get("name") or "unknown"), str(delivery))
            elif kind == "task-started":
                waiting = self._waiting.pop(uuid, None)
                started = float(event.get("timestamp") or now)
                if waiting is not None:
                    delay = max(0.0, started - waiting.since)
                    self.wait.labels(waiting.name, waiting.queue).observe(delay)
                else:
                    self._started_early[uuid] = started
                    while len(self._started_early) > self.max_tracked:
                        self._started_early.popitem(last=False)
            elif kind == "task-succeeded":
                self.succeeded.labels(self._identity(uuid)[0]).inc()
            elif kind == "task-failed":
                self._waiting.pop(uuid, None)
                name = self._identity(uuid)[0]
                self.failed.labels(name, _exception_type(event.get("exception"))).inc()
            elif kind == "task-retried":
                self.retried.labels(self._identity(uuid)[0]).inc()
            elif kind == "task-rejected":
                waiting = self._waiting.pop(uuid, None)
                self.rejected.labels(waiting.queue if waiting else "unknown").inc()
            elif kind == "task-revoked":
                self._waiting.pop(uuid, None)

    def nothing_ready_in(self, queue: str, observed_at: float) -> None:
        """The broker says `queue` has no ready message: what we still track there is gone.

        A task dead-lettered by the delivery limit, or deleted with its queue, sends no
        event; without this its wait would grow forever. Tasks learned of after the broker was
        read, and countdown/ETA tasks not yet due, are kept.
        """
        with self._lock:
            stale = [
                uuid
                for uuid, waiting in self._waiting.items()
                if waiting.queue == queue
                and waiting.seen < observed_at
                and waiting.since <= observed_at
            ]
            for uuid in stale:
                del self._waiting[uuid]

    def waiting_by_queue(self, now: float) -> dict[str, tuple[int, float]]:
        """queue -> (tasks due and not started, age of the oldest in seconds)."""
        result: dict[str, tuple[int, float]] = {}
        with self._lock:
            for waiting in self._waiting.values():
                if waiting.since > now:
                    continue  # a countdown/ETA task that is not due yet is not waiting
                count, oldest = result.get(waiting.queue, (0, 0.0))
                result[waiting.queue] = (count + 1, max(oldest, now - waiting.since))
        return result

    # --- the consumer thread ---------------------------------------------------------------
    def consume_forever(self, app: Celery, stop: threading.Event) -> None:
        """Consume the event stream, reconnecting after any broker trouble, until `stop`."""
        while not stop.is_set():
            try:
                with app.connection_for_read() as connection:
                    receiver = app.events.Receiver(connection, handlers={"*": self.handle})
                    _stop_with(receiver, stop)
                    self.connected.set(1)
                    # No wakeup broadcast: it is a write to celery.pidbox, which the read-only
                    # exporter role may not do; workers send a heartbeat every 2 s anyway.
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:
                logger.warning("event stream lost, reconnecting: %r", exc)
                stop.wait(RECONNECT_INTERVAL)
            finally:
                self.connected.set(0)


def _stop_with(receiver: Any, stop: threading.Event) -> None:
    """Make the receiver end its capture once `stop` is set.

    The receiver calls on_iteration about every second, events or not, and ends its loop when
    it sees should_stop.
    """

    def on_iteration() -> None:
        receiver.should_stop = stop.is_set()

    receiver.on_iteration = on_iteration


class BrokerCollector(Collector):
    """Queue figures read from RabbitMQ at each scrape."""

    def __init__(self, app: Celery, events: TaskEvents | None, api_url: str | None) -> None:
        self.app = app
        self.events = events
        self.api_url = api_url

    def collect(self) -> Iterator[Metric]:
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
        if snap.delayed is not None:
            delayed.add_metric([], snap.delayed)
        yield from (up, ready, consumers, dead)
        if snap.source == "management":
            yield from (unacked, delayed)
        yield from self._waiting(observed_at)

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
    events = TaskEvents(registry) if with_events else None
    registry.register(BrokerCollector(app, events, api_url))
    for path in app.conf.get("conveyor_metrics_collectors") or ():
        registry.register(symbol_by_name(path)(app))
    return registry, events


@click.command(cls=CeleryCommand)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9808, show_default=True, help="Port of /metrics.")
@click.option(
    "--rabbitmq-api",
    envvar="CONVEYOR_RABBITMQ_API",
    default=None,
    help="RabbitMQ management API, e.g. http://user:pw@rabbitmq:15672/api/ "
    "(adds unacked and delayed counts). Default: conveyor_rabbitmq_api.",
)
@click.pass_context
def exporter(ctx: click.Context, address: str, port: int, rabbitmq_api: str | None) -> None:
    """Serve Conveyor's Prometheus metrics (queues, dead letters, waits, failures)."""
    app: Celery = ctx.obj.app
    registry, events = build_registry(app, rabbitmq_api or app.conf.get("conveyor_rabbitmq_api"))
    stop = threading.Event()
    assert events is not None
    thread = threading.Thread(
        target=events.consume_forever, args=(app, stop), name="events", daemon=True
    )
    thread.start()
    server, _ = start_http_server(port, addr=address, registry=registry)
    logger.info("exporter serving http://%s:%s/metrics", address, server.server_port)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.shutdown()
