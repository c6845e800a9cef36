"""Webhook delivery through a real worker to an HTTP server on loopback."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from celery.exceptions import TimeoutError as ResultTimeout
from celery.signals import before_task_publish

from tasks import webhooks
from tests.infra import WorkerProcess

pytestmark = pytest.mark.integration


@dataclass
class Subscriber:
    """A loopback HTTP server that answers with the queued statuses, then 200."""

    statuses: list[int] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    state = Subscriber()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append({"headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


def test_a_webhook_is_delivered_with_an_idempotency_key(
    worker: WorkerProcess, subscriber: Subscriber
) -> None:
    result = webhooks.enqueue(subscriber.url, "order.paid", {"order": 7, "total": "19.90"})

    assert result.get(timeout=20) == {"status": 200, "url": subscriber.url, "event": "order.paid"}
    [request] = subscriber.requests
    assert request["body"] == {"order": 7, "total": "19.90"}
    assert request["headers"]["Idempotency-Key"] == result.id
    assert request["headers"]["X-Conveyor-Event"] == "order.paid"


def test_a_subscriber_error_is_retried_until_it_is_accepted(
    worker: WorkerProcess, subscriber: Subscriber
) -> None:
    subscriber.statuses = [503]
    result = webhooks.enqueue(subscriber.url, "order.paid", {"order": 8})

    assert result.get(timeout=30)["status"] == 200
    assert len(subscriber.requests) == 2
    keys = {r["headers"]["Idempotency-Key"] for r in subscriber.requests}
    assert keys == {result.id}, "a retry must keep the idempotency key"


def test_a_rejected_webhook_fails_without_retrying(
    worker: WorkerProcess, subscriber: Subscriber
) -> None:
    subscriber.statuses = [410]
    result = webhooks.enqueue(subscriber.url, "order.paid", {"order": 9})

    with pytest.raises(webhooks.DeliveryRejected):
        try:
            result.get(timeout=20)
        except ResultTimeout:
            pytest.fail("a rejected delivery should fail, not hang")
    assert len(subscriber.requests) == 1


def test_bad_webhook_input_fails_at_the_call_and_publishes_nothing(
    worker: WorkerProcess,
) -> None:
    with pytest.raises(ValueError, match="absolute http"):
        webhooks.enqueue("ftp://example.invalid/", "order.paid", {})
    with pytest.raises(TypeError):
        webhooks.deliver.delay("http://127.0.0.1/", "order.paid")  # payload missing


def test_decimals_datetimes_and_uuids_reach_the_subscriber_as_documented(
    worker: WorkerProcess, subscriber: Subscriber
) -> None:
    # Given a payload with the types kombu's JSON carries (README: "What a task accepts")
    order = uuid.UUID("12345678-1234-5678-1234-567812345678")
    paid_at = datetime(2026, 12, 3, 18, 30, tzinfo=UTC)
    payload = {"amount": Decimal("1.50"), "paid_at": paid_at, "order": order}

    # When it is delivered through a real worker
    result = webhooks.deliver.delay(subscriber.url, "order.paid", payload)

    # Then the subscriber gets exact strings: no float rounding, ISO 8601, canonical UUID
    assert result.get(timeout=20)["status"] == 200
    [request] = subscriber.requests
    assert request["body"] == {
        "amount": "1.50",
        "paid_at": "2026-12-03T18:30:00+00:00",
        "order": "12345678-1234-5678-1234-567812345678",
    }


def test_what_a_webhook_cannot_carry_fails_at_the_call_with_value_error(
    conveyor_app: Any,
) -> None:
    published: list[str] = []

    def count(sender: str | None = None, **_: Any) -> None:
        published.append(str(sender))

    before_task_publish.connect(count, weak=False)
    try:
        for call in (webhooks.enqueue, webhooks.deliver.delay):
            with pytest.raises(ValueError, match="JSON"):
                call("http://127.0.0.1/", "order.paid", {"tags": {"a", "b"}})
            with pytest.raises(ValueError, match="JSON"):
                call("http://127.0.0.1/", "order.paid", {"blob": object()})
        # deliver's own check (validate_arguments) runs in the caller's process too
        with pytest.raises(ValueError, match="absolute http"):
            webhooks.deliver.delay("ftp://example.invalid/", "order.paid", {})
    finally:
        before_task_publish.disconnect(count)
    assert published == []
