"""The exporter's event state machine: waits, retries and failures from Celery's event stream."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from kombu import Queue
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


#: Label value for a queue outside the closed set, a task or exception type past the limit.
OTHER = "other"
#: Distinct task names (and exception types) a counter may label: tasks are named in code, so
#: a real deployment stays far below this; a publisher inventing names cannot grow the series.
MAX_NAMES = 200
#: Native delayed delivery's routing key: 28 binary digits of the delay, then the queue's key.
DELAYED_ROUTING_KEY = re.compile(r"^(?:[01]\.){28}")
#: The type at the head of an exception's repr: `ValueError('...')` -> ValueError, and
#: `<HTTPError 410: 'Gone'>` (a repr of another form) -> HTTPError.
EXCEPTION_TYPE = re.compile(r"^\s*(?:<([A-Za-z_][\w.]*)[\s:>]|([A-Za-z_][\w.]*)\s*(?:\(|$))")


def _exception_type(exception: Any) -> str:
    """`ValueError('x')` -> `ValueError`: the type only, never the message (which may hold a
    URL or a secret); `unknown` when the text does not start with a type name."""
    found = EXCEPTION_TYPE.match(str(exception or ""))
    return (found.group(1) or found.group(2)) if found else "unknown"


class QueueLabels:
    """Maps a queue name, a routing key or a delayed-delivery routing key to a declared queue's
    name, or `other`: the closed set of queue label values."""

    def __init__(self, queues: Iterable[Queue]) -> None:
        self.by_key: dict[str, str] = {}
        for queue in queues:
            self.by_key[queue.name] = queue.name
            self.by_key.setdefault(str(queue.routing_key or queue.name), queue.name)
        self.values = frozenset([*self.by_key.values(), OTHER])

    def __call__(self, *candidates: Any) -> str:
        for candidate in candidates:
            if candidate:
                key = DELAYED_ROUTING_KEY.sub("", str(candidate))
                return self.by_key.get(key, OTHER)
        return OTHER


class NameLabels:
    """The first `limit` distinct names as themselves, later ones as `other`."""

    def __init__(self, limit: int = MAX_NAMES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, name: Any) -> str:
        text = str(name or "unknown")
        if text in self.seen:
            return text
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(text)
        return text


def configured_queues(conf: Any = None) -> list[Queue]:
    """The task queues and the dead-letter queue of `conf` (an app's), or of celeryconfig."""
    if conf is None:
        import celeryconfig as conf
    return [*conf.task_queues, Queue(conf.conveyor_dead_letter_queue)]


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

    def __init__(
        self,
        registry: CollectorRegistry,
        max_tracked: int = MAX_TRACKED_TASKS,
        *,
        queues: Iterable[Queue] | None = None,
    ) -> None:
        self.max_tracked = max_tracked
        #: Every label value comes from a closed set (docs/monitoring.md): the declared queues
        #: and `other`; at most MAX_NAMES task names and exception types, then `other`.
        self.queue_label = QueueLabels(configured_queues() if queues is None else queues)
        self.task_label = NameLabels()
        self.exception_label = NameLabels()
        self.reason_label = NameLabels()
        self._handlers: dict[str, Callable[[str, dict[str, Any], float], None]] = {
            "task-sent": self._on_sent,
            "task-received": self._on_received,
            "task-started": self._on_started,
            "task-succeeded": self._on_succeeded,
            "task-failed": self._on_failed,
            "task-retried": self._on_retried,
            "task-rejected": self._on_rejected,
            "task-revoked": self._on_revoked,
        }
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        self._names: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: Start times of tasks whose task-sent event had not arrived when they started. The
        #: task-sent event goes out after the task's confirm, on another connection, and a
        #: bulk enqueue sends them in lists, so a worker may start a task first.
        self._started_early: OrderedDict[str, float] = OrderedDict()
        self._declare_task_metrics(registry)
        self._declare_rejection_metrics(registry)

    def _declare_task_metrics(self, registry: CollectorRegistry) -> None:
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

    def _declare_rejection_metrics(self, registry: CollectorRegistry) -> None:
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
        return self._names.get(uuid, ("unknown", OTHER))

    # --- events ----------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        if kind == REJECTED_EVENT:
            reason = self.reason_label(event.get("reason"))
            self.messages_rejected.labels(reason, self.queue_label(event.get("queue"))).inc()
            return
        handler = self._handlers.get(kind)
        uuid = event.get("uuid")
        if handler is None or not uuid:
            return
        with self._lock:
            handler(str(uuid), event, time.time())

    def _on_sent(self, uuid: str, event: dict[str, Any], now: float) -> None:
        name = self.task_label(event.get("name"))
        queue = self.queue_label(event.get("queue"), event.get("routing_key"))
        self._remember(uuid, name, queue)
        self.sent.labels(name, queue).inc()
        sent = float(event.get("timestamp") or now)
        due = max(sent, _timestamp(event.get("eta")) or sent)
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

    def _on_received(self, uuid: str, event: dict[str, Any], now: float) -> None:
        if uuid not in self._names:
            name = self.task_label(event.get("name"))
            self._remember(uuid, name, self.queue_label(event.get("routing_key")))

    def _on_started(self, uuid: str, event: dict[str, Any], now: float) -> None:
        waiting = self._waiting.pop(uuid, None)
        started = float(event.get("timestamp") or now)
        if waiting is not None:
            self.wait.labels(waiting.name, waiting.queue).observe(max(0.0, started - waiting.since))
            return
        self._started_early[uuid] = started
        while len(self._started_early) > self.max_tracked:
            self._started_early.popitem(last=False)

    def _on_succeeded(self, uuid: str, event: dict[str, Any], now: float) -> None:
        self.succeeded.labels(self._identity(uuid)[0]).inc()

    def _on_failed(self, uuid: str, event: dict[str, Any], now: float) -> None:
        self._waiting.pop(uuid, None)
        exception = self.exception_label(_exception_type(event.get("exception")))
        self.failed.labels(self._identity(uuid)[0], exception).inc()

    def _on_retried(self, uuid: str, event: dict[str, Any], now: float) -> None:
        self.retried.labels(self._identity(uuid)[0]).inc()

    def _on_rejected(self, uuid: str, event: dict[str, Any], now: float) -> None:
        # The queue it came from, known since its task-sent or task-received event (it has
        # usually started, so it is no longer among the waiting).
        self._waiting.pop(uuid, None)
        self.rejected.labels(self._identity(uuid)[1]).inc()

    def _on_revoked(self, uuid: str, event: dict[str, Any], now: float) -> None:
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
