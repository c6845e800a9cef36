"""Monitoring events go out on unconfirmed connections; everything else stays confirmed."""

from __future__ import annotations

import weakref
from collections import deque
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.utils.imports import symbol_by_name

from core import events
from tasks import app


def test_the_worker_uses_the_consumer_whose_event_connection_is_unconfirmed() -> None:
    assert issubclass(symbol_by_name(app.conf.worker_consumer), events.Consumer)


def test_the_workers_event_connection_asks_for_no_confirms_and_the_apps_own_do() -> None:
    consumer = SimpleNamespace(app=app, ensure_connected=lambda connection: connection)
    event_connection = events.Consumer.connection_for_write(consumer)
    try:
        assert event_connection.transport_options["confirm_publish"] is False
    finally:
        event_connection.release()
    with app.connection_for_write() as task_connection:
        assert task_connection.transport_options["confirm_publish"] is True


def test_task_sent_events_have_one_unconfirmed_dispatcher_per_process_and_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Celery lets CELERY_BROKER_URL override any configured broker_url.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    # An in-memory broker: the dispatcher connects when it is made.
    producer = Celery("producer", broker="memory://a", set_as_current=False)
    producer.conf.broker_transport_options = {"confirm_publish": True}
    dispatcher = events.sent_event_dispatcher(producer)
    assert events.sent_event_dispatcher(producer) is dispatcher
    assert dispatcher.connection.transport_options["confirm_publish"] is False
    # Pointed at another broker (as tests and re-configured apps do), the events follow it.
    producer.conf.broker_url = "memory://b"
    assert events.sent_event_dispatcher(producer) is not dispatcher


def test_task_sent_events_a_broker_refuses_are_dropped_and_logged_not_raised_or_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    producer = Celery("producer", broker="memory://refusing", set_as_current=False)
    sent = events.BatchedSentEvents(producer, size=2, interval=60)
    dispatcher = sent.dispatcher

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(dispatcher.producer, "publish", refuse)

    # When a full list is flushed by the caller whose task was just confirmed
    sent.publish("task-sent", {"uuid": "a"}, None, retry=False)
    sent.publish("task-sent", {"uuid": "b"}, None, retry=False)

    # Then the caller sees no error, the events are not kept, and the loss is in the log
    assert dispatcher._outbound_buffer == deque()
    assert sent._events == []
    assert "2 task-sent events dropped" in caplog.text
    sent.close()


def test_closing_an_app_sends_its_waiting_events_and_stops_their_thread_and_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    producer = Celery("producer", broker="memory://closing", set_as_current=False)
    producer.conf.conveyor_sent_event_interval = 60  # only close() can send it in time
    sent = events.sent_events(producer)
    published: list[list[dict[str, str]]] = []
    monkeypatch.setattr(sent.dispatcher, "_publish", lambda body, *a, **kw: published.append(body))
    sent.publish("task-sent", {"uuid": "a"}, None)
    assert sent._flusher is not None and sent._flusher.is_alive()

    # When the app is closed
    with producer:
        pass

    # Then the waiting event went out, the thread ended, and the connection is closed
    assert [[event["uuid"] for event in body] for body in published] == [["a"]]
    assert not sent._flusher.is_alive()
    assert not sent.dispatcher.connection.connected
    # and the app, if used again, gets a buffer of its own
    assert events.sent_events(producer) is not sent
    producer.close()


def test_at_exit_every_open_buffer_sends_its_events_and_stops_its_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    # Only this test's buffer: the exit handler closes every buffer of the process.
    monkeypatch.setattr(events, "_open", weakref.WeakSet())
    producer = Celery("producer", broker="memory://exiting", set_as_current=False)
    producer.conf.conveyor_sent_event_interval = 60
    sent = events.sent_events(producer)
    published: list[list[dict[str, str]]] = []
    monkeypatch.setattr(sent.dispatcher, "_publish", lambda body, *a, **kw: published.append(body))
    sent.publish("task-sent", {"uuid": "b"}, None)

    # When the interpreter exits (the handler core.events registers with atexit)
    events._close_all()

    # Then the app's waiting event went out and its thread ended
    assert [[event["uuid"] for event in body] for body in published] == [["b"]]
    assert sent._flusher is not None and not sent._flusher.is_alive()
    # and a publish after it, from a late exit handler, opens a buffer of its own
    assert events.sent_events(producer) is not sent
    producer.close()
