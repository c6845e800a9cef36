"""The exporter's event state machine: waits, retries and failures from Celery's event stream."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
