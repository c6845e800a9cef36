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
(task-sent events, sent by ``delay()``) is in ``sent_event_dispatcher``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery
from celery.events.dispatcher import EventDispatcher
from celery.worker.consumer import Consumer as CeleryConsumer

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


class SentEventDispatcher(EventDispatcher):
    """Publishes task-sent events on its own unconfirmed connection.

    Celery publishes the task-sent event with the producer that sent the task, so on the same
    confirmed channel: a second confirmed round trip for every ``delay()``. Passed to
    ``apply_async`` as ``event_dispatcher``, this ignores that producer and uses its own.
    The event is still sent after the task's confirm, with the same fields and retry policy.
    """

    def publish(self, type: str, fields: Any, producer: Any, *args: Any, **kwargs: Any) -> Any:
        producer = self.producer  # type: ignore[attr-defined]  # set by enable(), not in the stubs
        return super().publish(type, fields, producer, *args, **kwargs)


_dispatchers: dict[tuple[int, int, str], SentEventDispatcher] = {}
_lock = threading.Lock()


def sent_event_dispatcher(app: Celery) -> SentEventDispatcher:
    """This process's dispatcher of task-sent events for `app` (a new one after a fork, or
    when the app is pointed at another broker: the events must go where the tasks go)."""
    key = (id(app), os.getpid(), str(app.conf.broker_url))
    dispatcher = _dispatchers.get(key)
    if dispatcher is None:
        with _lock:
            dispatcher = _dispatchers.get(key)
            if dispatcher is None:
                # No heartbeat: a producer process does not service one, and the broker would
                # close an idle connection; a dead one is re-established by the publish retry.
                connection = app.connection_for_write(heartbeat=0, transport_options=UNCONFIRMED)
                dispatcher = SentEventDispatcher(connection, app=app, enabled=True)
                _dispatchers[key] = dispatcher
    return dispatcher


class BatchedSentEvents:
    """The task-sent events of a bulk publish, sent as lists of up to `size` per message.

    Passed to ``apply_async`` as ``event_dispatcher`` (Celery calls only its ``publish``).
    Celery's event receivers (Flower, the exporter, ``celery events``) read a list body as
    that many events, as they read the worker's own buffered task events, so a bulk enqueue
    of N tasks sends N/size event messages instead of N. The events use this process's
    task-sent connection (`sent_event_dispatcher`) and keep their fields and clocks; they go
    out when `size` are waiting and on `flush()`, which the publisher calls once its tasks
    are confirmed.
    """

    def __init__(self, app: Celery, size: int = 100) -> None:
        self.dispatcher = sent_event_dispatcher(app)
        self.size = max(1, int(size))
        self._events: list[Any] = []
        self._send_options: dict[str, Any] = {}

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
        # The dispatcher's own event builder: hostname, pid, clock and offset as Celery sets.
        event = self.dispatcher._prepare_event(type, fields, blind=blind)  # type: ignore[attr-defined]
        self._events.append(event)
        self._send_options = {"retry": retry, "retry_policy": retry_policy}
        if len(self._events) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self._events:
            return
        events, self._events = self._events, []
        dispatcher = self.dispatcher
        with dispatcher.mutex:  # type: ignore[attr-defined]
            dispatcher._publish(  # type: ignore[attr-defined]
                events,
                dispatcher.producer,  # type: ignore[attr-defined]
                routing_key="task.multi",
                **self._send_options,
            )
