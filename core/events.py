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
import weakref
from typing import Any

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


#: This process's open buffers, closed at interpreter exit and forgotten in a forked child.
_open: weakref.WeakSet[BatchedSentEvents] = weakref.WeakSet()
#: Where an app keeps its buffer: on the app itself, so that it is the app's to close and
#: goes with it (a cache keyed by id(app) would keep every app alive, or hand a new app that
#: reuses an id the old app's connection).
_ATTRIBUTE = "_conveyor_sent_events"
_lock = threading.Lock()


def sent_event_dispatcher(app: Celery) -> EventDispatcher:
    """This process's dispatcher of task-sent events for `app`, on its own unconfirmed
    connection (Celery would publish them with the task's producer, on the confirmed channel);
    `BatchedSentEvents` sends through it."""
    return sent_events(app).dispatcher


def _event_dispatcher(app: Celery) -> EventDispatcher:
    # No heartbeat: a producer process does not service one, and the broker would close
    # an idle connection; a dead one is re-established by the publish retry.
    connection = app.connection_for_write(heartbeat=0, transport_options=UNCONFIRMED)
    # Not buffered while offline: Celery's offline buffer is unbounded and only a worker
    # ever sends it again, so in a producer it would only grow (BatchedSentEvents.flush
    # drops and logs what the publish retries could not deliver).
    return EventDispatcher(connection, app=app, enabled=True, buffer_while_offline=False)


class BatchedSentEvents:
    """This process's task-sent events, sent as lists of up to `size` events per message.

    Passed to ``apply_async`` as ``event_dispatcher`` (Celery calls only its ``publish``).
    Celery's event receivers (Flower, the exporter, ``celery events``) read a list body as
    that many events, as they read the worker's own buffered task events. An event keeps the
    time of its publish as its timestamp and goes out when `size` are waiting, at the latest
    `interval` seconds later from a background thread, or on `flush()` (a bulk enqueue calls it
    once its tasks are confirmed). `close()` flushes, stops the thread and closes the
    connection: ``app.close()`` and interpreter exit call it.

    One event publish cost a third of a single confirmed ``delay()``'s CPU and a quarter of a
    bulk enqueue's (docs/performance.md). The price: a monitor sees a task-sent event up to
    `interval` late, possibly after the task started (the exporter allows for that), and the
    events still buffered when a process is killed are lost, as any transient event may be.
    """

    def __init__(self, app: Celery, size: int = 100, interval: float = 0.1) -> None:
        self.dispatcher = _event_dispatcher(app)
        #: The process and broker this buffer's connection belongs to.
        self.pid = os.getpid()
        self.broker_url = str(app.conf.broker_url)
        #: Set by close(): the app then gets a new buffer if it sends again.
        self.closed = False
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

    def _flush_every_interval(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the thread must outlive any one bad list
                logger.exception("task-sent events not published")

    def close(self, timeout: float = 5.0) -> None:
        """Send what is waiting, stop the flusher thread and close the connection."""
        self.closed = True
        _open.discard(self)
        self._wake.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout)
        self.flush()
        self.dispatcher.close()
        if self.dispatcher.connection is not None:
            self.dispatcher.connection.release()

    def forget(self) -> None:
        """In a forked child: drop the parent's buffer and sockets without a word to the broker.

        The parent sends its own events; an AMQP close (or a socket shutdown, which py-amqp's
        close does) from the child would end the connection the parent still uses. Closing
        the inherited descriptor alone leaves the parent's connection up.
        """
        _open.discard(self)
        self._events = []
        amqp_connection = getattr(self.dispatcher.connection, "_connection", None)
        sock = getattr(getattr(amqp_connection, "transport", None), "sock", None)
        if sock is not None:
            sock.close()


def sent_events(app: Celery) -> BatchedSentEvents:
    """This process's buffer of task-sent events for `app`: built on first use in each process
    (so a forked child opens its own connection), and again when the app is pointed at another
    broker (the events must go where the tasks go)."""
    buffer = _buffer_of(app)
    if buffer is not None and _serves(buffer, app):
        return buffer
    with _lock:
        buffer = _buffer_of(app)
        if buffer is not None and _serves(buffer, app):
            return buffer
        if buffer is not None and buffer.pid == os.getpid():
            buffer.close()
        buffer = BatchedSentEvents(
            app,
            # Defaults for an app configured without Conveyor's settings.
            size=int(app.conf.get("conveyor_sent_event_batch", 100)),
            interval=float(app.conf.get("conveyor_sent_event_interval", 0.1)),
        )
        setattr(app, _ATTRIBUTE, buffer)
        _open.add(buffer)
        _close_with(app)
        return buffer


def _buffer_of(app: Celery) -> BatchedSentEvents | None:
    buffer = app.__dict__.get(_ATTRIBUTE)
    return buffer if isinstance(buffer, BatchedSentEvents) else None


def _serves(buffer: BatchedSentEvents, app: Celery) -> bool:
    return (
        not buffer.closed
        and buffer.pid == os.getpid()
        and buffer.broker_url == str(app.conf.broker_url)
    )


def release(app: Celery) -> None:
    """Close `app`'s task-sent events in this process, if it has any (``app.close()`` calls
    it). The app opens a new buffer if it sends again."""
    with _lock:
        buffer = _buffer_of(app)
        app.__dict__.pop(_ATTRIBUTE, None)
    if buffer is not None and buffer.pid == os.getpid():
        buffer.close()


def _close_with(app: Celery) -> None:
    """Make ``app.close()`` (and ``with app:``) release the sent events too.

    Celery's close only drops its connection pool and has no hook, and Conveyor's task class
    may serve any app (tests and embedding code create their own), so the app's own `close` is
    wrapped, once.
    """
    close = app.close
    if getattr(close, "releases_sent_events", False):
        return

    def close_and_release() -> None:
        release(app)
        close()

    close_and_release.releases_sent_events = True  # type: ignore[attr-defined]
    app.close = close_and_release  # type: ignore[method-assign]


@atexit.register
def _close_all() -> None:
    for buffer in list(_open):
        if buffer.pid == os.getpid():
            buffer.close(timeout=1.0)


def _forget_inherited() -> None:
    global _lock
    # A lock held by another thread at the fork stays held in the child forever.
    _lock = threading.Lock()
    for buffer in list(_open):
        buffer.forget()


os.register_at_fork(after_in_child=_forget_inherited)
