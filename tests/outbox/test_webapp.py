"""examples/webapp over HTTP: an order placed while RabbitMQ is down still gets its webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from examples.webapp.app import create_app
from tests.infra import ChaosRabbitNode, WorkerProcess, wait_for
from tests.outbox.conftest import RelayFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def subscriber() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook subscriber on a free port: its URL and the deliveries it received."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks", received
    server.shutdown()


def test_an_order_placed_while_the_broker_is_down_is_saved_and_its_webhook_sent_later(
    conveyor_app: Any,
    outbox_db: str,
    start_relay: RelayFactory,
    result_backend: str,
    ledger_url: str,
    subscriber: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    url, received = subscriber
    node = ChaosRabbitNode(tmp_path / "rabbit").start()
    worker = WorkerProcess(
        broker_url=node.url,
        result_backend=result_backend,
        workdir=tmp_path / "worker",
        env={"CONVEYOR_TEST_LEDGER_URL": ledger_url},
    )
    try:
        worker.start(timeout=90)
        start_relay(node.url)
        client = TestClient(create_app(outbox_db))

        # Given RabbitMQ unreachable
        node.stop_app()

        # When an order is placed, and another one is refused
        response = client.post(
            "/orders", json={"customer": "ada", "amount": "12.50", "webhook_url": url}
        )
        refused = client.post("/orders", json={"customer": "bob", "amount": "-1"})

        # Then the request succeeds at once and the webhook waits in the outbox
        assert response.status_code == 201, response.text
        assert refused.status_code == 422
        order = response.json()
        assert client.get(f"/orders/{order['order_id']}").json()["webhook"] == "waiting"

        # And once the broker is back, the relay publishes it and the worker delivers it once
        node.start_app()
        wait_for(lambda: received, 90, what="the webhook to be delivered")
        assert client.get(f"/orders/{order['order_id']}").json()["webhook"] == "published"
        [delivery] = received
        assert delivery["headers"]["Idempotency-Key"] == order["task_id"]
        assert delivery["body"] == {
            "order_id": order["order_id"],
            "customer": "ada",
            "amount": "12.50",
        }
    finally:
        worker.stop()
        node.stop()
