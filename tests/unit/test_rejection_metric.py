"""Bad input refused by a worker reaches the exporter as a counter by reason."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitoring.exporter.events import TaskEvents
from workers import bad_input


class _Message:
    def __init__(self) -> None:
        self.headers = {"task": "tests.add", "id": "m-1"}
        self.delivery_info = {"routing_key": "batch"}
        self.body = b"[[1, 2"
        self.content_type = "application/json"


class _Dispatcher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, type_: str, **fields: Any) -> None:
        self.sent.append((type_, fields))


class _Consumer:
    def __init__(self) -> None:
        self.event_dispatcher = _Dispatcher()


def test_a_rejection_is_sent_as_an_event_with_its_reason_and_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = _Consumer()
    monkeypatch.setattr(bad_input, "_consumer", consumer)
    bad_input.count_rejection("undecodable", _Message(), "JSONDecodeError")
    assert consumer.event_dispatcher.sent == [
        ("conveyor-rejected", {"reason": "undecodable", "queue": "batch"})
    ]


def test_the_exporter_counts_rejection_events_by_reason_and_queue() -> None:
    registry = CollectorRegistry()
    events = TaskEvents(registry)
    for reason in ("undecodable", "undecodable", "not_a_task"):
        events.handle({"type": "conveyor-rejected", "reason": reason, "queue": "default"})

    def count(reason: str) -> float | None:
        labels = {"reason": reason, "queue": "default"}
        return registry.get_sample_value("conveyor_messages_rejected_total", labels)

    assert (count("undecodable"), count("not_a_task"), count("malformed")) == (2, 1, None)
    # Rejected tasks (task-rejected events) are a separate counter
    assert registry.get_sample_value("conveyor_tasks_rejected_total", {"queue": "default"}) is None
