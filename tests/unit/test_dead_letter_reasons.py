"""Dead-letter reasons: redaction, the queue a message came from, and how entries read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from core.dead_letters import MESSAGE_CHARS, reason_headers, short_message
from core.redaction import redact_text
from tasks.deadletter import store
from workers import bad_input
from workers.dead_letter import queue_of

DELAYED = "0." * 27 + "1.batch"


class _Message:
    def __init__(self, headers: dict[str, Any], routing_key: str = "default") -> None:
        self.headers = headers
        self.properties: dict[str, Any] = {}
        self.delivery_info = {"routing_key": routing_key, "consumer_tag": "tag-2"}
        self.body = b"[[], {}, {}]"
        self.content_type = "application/json"


class _TaskConsumer:
    def __init__(self) -> None:
        self._active_tags = {"default": "tag-1", "batch": "tag-2"}


class _Consumer:
    task_consumer = _TaskConsumer()

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.event_dispatcher = self

    def send(self, type_: str, **fields: Any) -> None:
        self.sent.append(fields)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "POST https://alice:s3cret@hooks.example.com/in failed",
            "POST https://alice:********@hooks.example.com/in failed",
        ),
        ("redis://:pw@cache:6379/0 refused", "redis://:********@cache:6379/0 refused"),
        (
            "login failed (password=hunter2, api_key: abc)",
            "login failed (password=********, api_key: ********)",
        ),
        (
            "plain words, user@example.com and http://host/x",
            "plain words, user@example.com and http://host/x",
        ),
    ],
)
def test_an_exception_message_is_redacted_like_the_settings(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_the_message_header_is_one_short_line() -> None:
    assert short_message("a\n  b\tc") == "a b c"
    assert len(short_message("x" * 5000)) == MESSAGE_CHARS


def test_the_queue_is_the_one_the_message_was_consumed_from() -> None:
    message = _Message({}, routing_key=DELAYED)
    assert queue_of(_Consumer(), message) == "batch"
    # without the consumer's tags, the routing key without the delayed-delivery prefix
    assert queue_of(None, message) == "batch"


def test_the_rejection_event_names_the_queue_not_the_delayed_routing_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = _Consumer()
    monkeypatch.setattr(bad_input, "_consumer", consumer)
    bad_input.count_rejection("malformed", _Message({"id": "x"}, routing_key=DELAYED))
    assert consumer.sent == [{"reason": "malformed", "queue": "batch"}]


def test_an_entry_reads_the_worker_reason_before_the_broker_one() -> None:
    headers = {
        "id": "t-1",
        "task": "tests.add",
        "x-death": [{"queue": "celery_delayed_0", "reason": "expired", "count": 1}],
        **reason_headers("unknown_task", "NotRegistered", "no task", worker="w@h", queue="batch"),
    }
    entry = store.entry_from(_Message(headers))
    assert (entry.reason, entry.queue, entry.worker) == ("unknown_task", "batch", "w@h")
    assert (entry.exception, entry.message, entry.replayable) == ("NotRegistered", "no task", False)
    assert datetime.fromisoformat(str(entry.failed_at)) <= datetime.now(UTC)


def test_a_broker_dead_letter_keeps_rabbitmqs_reason_and_names_its_schedule() -> None:
    # py-amqp gives the x-death time as a naive UTC datetime
    when = datetime(2026, 1, 2, 3, 4, 5)
    headers = {
        "id": "t-2",
        "conveyor_schedule": "nightly-report",
        "x-death": [{"queue": "default", "reason": "expired", "count": 1, "time": when}],
    }
    entry = store.entry_from(_Message(headers))
    assert (entry.reason, entry.queue, entry.schedule) == ("expired", "default", "nightly-report")
    assert entry.failed_at == "2026-01-02T03:04:05+00:00" and entry.replayable
    assert store.matching(reason="expired", origin="default")(entry)
    assert not store.matching(reason="expired", task="other")(entry)


def test_the_dead_letter_store_reads_the_header_beat_writes() -> None:
    from tasks.deadletter.store import SCHEDULE_HEADER
    from tasks.schedule.entries import ENTRY_HEADER

    assert SCHEDULE_HEADER == ENTRY_HEADER
