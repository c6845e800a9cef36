"""Dramatiq on the same broker and queue type: quorum queues, confirmed publishes, prefetch 1."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from benchmarks.workload import record_latency

QUEUE = "bench_dramatiq"


class QuorumRabbitmqBroker(RabbitmqBroker):  # type: ignore[misc]
    """Dramatiq declares classic queues; the comparison runs every system on quorum queues."""

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = super()._build_queue_arguments(queue_name)
        arguments["x-queue-type"] = "quorum"
        return arguments


_url = os.environ["CELERY_BROKER_URL"]
# pika reads "//" as the empty vhost; kombu (and so the other systems) read it as "/".
broker = QuorumRabbitmqBroker(
    url=_url[:-1] + "%2F" if _url.endswith("//") else _url, confirm_delivery=True
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    return None


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def latency(sent: float) -> None:
    record_latency(sent)
