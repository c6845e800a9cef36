"""The floor: pika straight on the broker, with the same ack and prefetch semantics.

``python -m benchmarks.raw_amqp consume URL QUEUE --processes 2`` runs the consumers: prefetch 1,
one ack per message after the (empty) work, like a late-acking Celery worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import time
from typing import Any

import pika

from benchmarks.environment import pika_parameters
from benchmarks.workload import record_latency

QUEUE = "bench_raw"
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}


def declare(channel: Any, queue: str = QUEUE) -> None:
    channel.queue_declare(queue, durable=True, arguments=QUEUE_ARGUMENTS)


def _consume(broker_url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika_parameters(broker_url))
    channel = connection.channel()
    declare(channel, queue)
    channel.basic_qos(prefetch_count=1)

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        message = json.loads(body)
        if "sent" in message:
            record_latency(message["sent"])
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_message)
    signal.signal(signal.SIGTERM, lambda *_: channel.stop_consuming())
    try:
        channel.start_consuming()
    finally:
        connection.close()


def consume(broker_url: str, queue: str, processes: int) -> None:
    children = [
        multiprocessing.Process(target=_consume, args=(broker_url, queue)) for _ in range(processes)
    ]
    for child in children:
        child.start()

    def stop(*_: Any) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.join()


class ConfirmedPublisher:
    """One blocking confirm per message: the floor for a single `delay()`."""

    def __init__(self, broker_url: str, queue: str = QUEUE) -> None:
        self.connection = pika.BlockingConnection(pika_parameters(broker_url))
        self.channel = self.connection.channel()
        declare(self.channel, queue)
        self.channel.confirm_delivery()
        self.queue = queue

    def publish(self, message: dict[str, Any]) -> None:
        self.channel.basic_publish(
            "",
            self.queue,
            json.dumps(message).encode(),
            pika.BasicProperties(delivery_mode=2, content_type="application/json"),
        )

    def close(self) -> None:
        self.connection.close()


def publish_pipelined(broker_url: str, count: int, queue: str = QUEUE, window: int = 1000) -> float:
    """Publish `count` persistent messages keeping up to `window` confirms outstanding.

    Returns the seconds from the first publish to the last confirm.
    """
    state = {"published": 0, "confirmed": 0, "started": 0.0, "finished": 0.0}
    body = json.dumps({"n": 0}).encode()
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    connection: Any = None

    def fill(channel: Any) -> None:
        while state["published"] < count and state["published"] - state["confirmed"] < window:
            channel.basic_publish("", queue, body, properties)
            state["published"] += 1

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            raise RuntimeError("the broker refused a message")
        state["confirmed"] = method.delivery_tag if method.multiple else state["confirmed"] + 1
        if state["confirmed"] >= count:
            state["finished"] = time.perf_counter()
            connection.close()
        else:
            fill(channel_holder[0])

    channel_holder: list[Any] = []

    def on_declared(_: Any) -> None:
        channel = channel_holder[0]
        channel.confirm_delivery(on_confirm)
        state["started"] = time.perf_counter()
        fill(channel)

    def on_channel(channel: Any) -> None:
        channel_holder.append(channel)
        channel.queue_declare(queue, durable=True, arguments=QUEUE_ARGUMENTS, callback=on_declared)

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    connection = pika.SelectConnection(pika_parameters(broker_url), on_open_callback=on_open)
    connection.ioloop.call_later(600, connection.close)
    connection.add_on_close_callback(lambda *_: connection.ioloop.stop())
    connection.ioloop.start()
    if state["confirmed"] < count:
        raise RuntimeError(f"only {state['confirmed']} of {count} publishes were confirmed")
    return state["finished"] - state["started"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_amqp")
    parser.add_argument("command", choices=["consume"])
    parser.add_argument("broker_url")
    parser.add_argument("queue")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    consume(args.broker_url, args.queue, args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
