"""Monitoring events go out without publisher confirms; tasks and results keep theirs.

``broker_transport_options = {"confirm_publish": True}`` puts every channel of every
connection in confirm mode, and py-amqp then waits for the broker's confirm after each publish.
That is the guarantee a task message needs, but a monitoring event is transient: it goes to the
``celeryev`` topic exchange, non-persistent, into Flower's and the exporter's auto-delete
queues, and nobody resends a lost one. Waiting for its confirm bought nothing and cost the
worker's main loop a broker round trip per event, three per task (received, started,
succeeded), and every ``delay()`` a second one (docs/performance.md).

The worker's event dispatcher is the only user of ``Consumer.connection_for_write``, so the
consumer class below gives that connection ``confirm_publish=False``. The producer side
(task-sent events, sent by ``delay()``) is ``sent_events``, over ``sent_event_dispatcher``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery
from celery.events.dispatcher import EventDispatcher
from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)

#: Transport options of a connection that only carries monitoring events.
UNCONFIRMED = {"confirm_publish": False}


class Consumer(CeleryConsumer):
    """Celery's consumer, with its event connection out of confirm mode (worker_consumer)."""

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        return self.ensure_connected(
            self.app.connection_for_write(
                url=url, heartbeat=heartbeat, transport_options=UNCONFIRMED
            )
        )


_dispatchers: dict[tuple[int, int, str], EventDispatcher] = {}
# Reentrant: sent_events() builds its buffer, which takes the dispatcher, under it.
_lock = threading.RLock()

T = TypeVar("T")


def _per_process(cache: dict[tuple[int, int, str], T], app: Celery, build: Callable[[], T]) -> T:
    """One `build()` per app, process and broker URL: a new one after a fork, or when the app
    is pointed at another broker (the events must go where the tasks go)."""
    key = (id(app), os.getpid(), str(app.conf.broker_url))
    value = cache.get(key)
    if value is None:
        with _lock:
            value = cache.get(key)
            if value is None:
                value = cache[key] = build()
    return value


def sent_event_dispatcher(app: Celery) -> EventDispatcher:
    """This process's dispatcher of task-sent events for `app`, on its own unconfirmed
    connection (Celery would publish them with the task's producer, on the confirmed channel);
    `BatchedSentEvents` sends through it."""

    def build() -> EventDispatcher:
        # No heartbeat: a producer process does not service one, and the broker would close
        # an idle connection; a dead one is re-established by the publish retry.
        connection = app.connection_for_write(heartbeat=0, transport_options=UNCONFIRMED)
        # Not buffered while offline: Celery's offline buffer is unbounded and only a worker
        # ever sends it again, so in a producer it would only grow (BatchedSentEvents.flush
        # drops and logs what the publish retries could not deliver).
        return EventDispatcher(connection, app=app, enabled=True, buffer_while_offline=False)

    return _per_process(_dispatchers, app, build)


class BatchedSentEvents:
    """This process's task-sent events, sent as lists of up to `size` events per message.

    Passed to ``apply_async`` as ``event_dispatcher`` (Celery calls only its ``publish``).
    Celery's event receivers (Flower, the exporter, ``celery events``) read a list body as
    that many events, as they read the worker's own buffered task events. An event keeps the
    time of its publish as its timestamp and goes out when `size` are waiting, at the latest
    `interval` seconds later from a background thread, or on `flush()` (a bulk enqueue calls it
    once its tasks are confirmed; exit calls it too).

    One event publish cost a third of a single confirmed ``delay()``'s CPU and a quarter of a
    bulk enqueue's (docs/performance.md). The price: a monitor sees a task-sent event up to
    `interval` late, possibly after the task started (the exporter allows for that), and the
    events still buffered when a process is killed are lost, as any transient event may be.
    """

    def __init__(self, app: Celery, size: int = 100, interval: float = 0.1) -> None:
        self.dispatcher = sent_event_dispatcher(app)
        self.size = max(1, int(size))
        self.interval = float(interval)
        self._events: list[Any] = []
        self._send_options: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()

    def publish(
        self,
        type: str,
        fields: Any,
        producer: Any,
        *,
        blind: bool = False,
        retry: bool = False,
        retry_policy: Any = None,
    ) -> None:
        # Only the publish time is taken here; the event is built when the list is sent, on
        # the flusher thread while the caller waits for its next confirm.
        with self._lock:
            self._events.append((type, fields, blind, time.time()))
            self._send_options = {"retry": retry, "retry_policy": retry_policy}
            full = len(self._events) >= self.size
            if self._flusher is None:
                self._start_flusher()
        if full:
            self.flush()

    def flush(self) -> None:
        dispatcher = self.dispatcher
        # Under the dispatcher's mutex from taking the events to publishing them: the flusher
        # thread and a caller flushing a full list send their lists in the order taken.
        with dispatcher.mutex:  # type: ignore[attr-defined]
            with self._lock:
                if not self._events:
                    return
                pending, self._events = self._events, []
                options = self._send_options
            # The dispatcher's own event builder: hostname, pid, clock and offset as Celery
            # sets, with the timestamp of the publish.
            events = [
                dispatcher._prepare_event(type, {**fields, "timestamp": at}, blind=blind)  # type: ignore[attr-defined]
                for type, fields, blind, at in pending
            ]
            try:
                dispatcher._publish(  # type: ignore[attr-defined]
                    events,
                    dispatcher.producer,  # type: ignore[attr-defined]
                    routing_key="task.multi",
                    **options,
                )
            except Exception as exc:
                # The tasks themselves were confirmed: a monitoring event, sent with the task
                # publish's own retry policy, must never fail the caller or pile up in memory.
                logger.warning("%d task-sent events dropped: %r", len(events), exc)

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(
            target=self._flush_every_interval, name="conveyor-sent-events", daemon=True
        )
        self._flusher.start()
        atexit.register(self._flush_at_exit)

    def _flush_every_interval(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the thread must outlive any one bad list
                logger.exception("task-sent events not published")

    def _flush_at_exit(self) -> None:
        self._wake.set()
        self.flush()


_batched: dict[tuple[int, int, str], BatchedSentEvents] = {}


def sent_events(app: Celery) -> BatchedSentEvents:
    """This process's buffer of task-sent events for `app`."""
    return _per_process(
        _batched,
        app,
        lambda: BatchedSentEvents(
            app,
            size=int(app.conf.conveyor_sent_event_batch),
            interval=float(app.conf.conveyor_sent_event_interval),
        ),
    )
