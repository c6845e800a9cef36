"""Chaos fixtures: one private RabbitMQ node the tests may break, and real workers on it.

The node has a short consumer_timeout (CHAOS_CONSUMER_TIMEOUT_MS) so that F12/F13 can share it:
every other chaos task finishes far below it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import pools

from tests.infra import ChaosRabbitNode, WorkerProcess, probe_path_for

CHAOS_CONSUMER_TIMEOUT_MS = 20_000
#: Kept small so that B6 can show the broker's own limit without moving 128 MiB.
CHAOS_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="package")
def chaos_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRabbitNode]:
    node = ChaosRabbitNode(
        tmp_path_factory.mktemp("chaos-rabbit"),
        consumer_timeout_ms=CHAOS_CONSUMER_TIMEOUT_MS,
        extra_config=f"max_message_size = {CHAOS_MAX_MESSAGE_BYTES}\n",
    ).start()
    yield node
    node.stop()


# Package scope: the app points back at the suite's broker before tests/integration runs.
@pytest.fixture(scope="package")
def chaos_app(conveyor_app: Any, chaos_rabbit: ChaosRabbitNode) -> Iterator[Any]:
    """The project's app publishing to the chaos node; pointed back when the chaos tests end."""
    with pointed_at(conveyor_app, chaos_rabbit.url):
        yield conveyor_app


@contextmanager
def pointed_at(app: Any, url: str) -> Iterator[None]:
    """The app publishes to `url` inside the block, and to its previous broker after it."""
    previous = app.conf.broker_url
    point_app(app, url)
    try:
        yield
    finally:
        point_app(app, previous)


def point_app(app: Any, url: str) -> None:
    # Every cached connection and producer pool belongs to the old broker. kombu keeps them in
    # a process-wide registry keyed by connection, so closing only the app's own pool left a
    # closed producer pool behind for the old URL ("Acquire on closed pool" once pointed back).
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    # Celery's Settings.broker_url prefers the CELERY_BROKER_URL variable over the setting,
    # and the conveyor_app fixture exports it.
    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url


@pytest.fixture
def chaos_ledger(ledger_url: str, chaos_app: Any, chaos_rabbit: ChaosRabbitNode) -> redis.Redis:
    """An empty ledger and empty task queues before each scenario."""
    client = redis.Redis.from_url(ledger_url, decode_responses=True)
    client.flushdb()
    for queue in ("default", "conveyor.dead_letter", "conveyor.unroutable"):
        if queue in chaos_rabbit.message_counts():
            chaos_rabbit.ctl("purge_queue", queue)
    return client


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def chaos_workers(
    tmp_path: Path, chaos_rabbit: ChaosRabbitNode, result_backend: str, ledger_url: str
) -> Iterator[WorkerFactory]:
    """Start real workers on the chaos node; every one is stopped after the test."""
    started: list[WorkerProcess] = []

    def start(
        name: str = "chaos",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        backend: str | None = None,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            broker_url=chaos_rabbit.url,
            result_backend=backend or result_backend,
            workdir=tmp_path / name,
            name=name,
            concurrency=concurrency,
            # chaos_tasks records when each task started and finished (time to recover).
            include="tests.worker_tasks,tests.chaos.chaos_tasks",
            # Idempotency markers beside the ledger, so tests.idempotent_effect's counter and
            # its marker commit in one transaction.
            env={
                "CONVEYOR_TEST_LEDGER_URL": ledger_url,
                "CONVEYOR_IDEMPOTENCY_URL": ledger_url,
                **(env or {}),
            },
        ).start(timeout=90)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=30)


def restart(worker: WorkerProcess) -> WorkerProcess:
    """Start a stopped or killed worker again under the same node name."""
    probe_path_for(worker, "ready").unlink(missing_ok=True)
    return worker.start(timeout=90)


@dataclass
class Chaos:
    """What a scenario needs: the app, the ledger, the node and a way to start workers."""

    app: Any
    ledger: redis.Redis
    rabbit: ChaosRabbitNode
    start_worker: WorkerFactory


@pytest.fixture
def chaos(
    chaos_app: Any,
    chaos_ledger: redis.Redis,
    chaos_rabbit: ChaosRabbitNode,
    chaos_workers: WorkerFactory,
) -> Chaos:
    return Chaos(chaos_app, chaos_ledger, chaos_rabbit, chaos_workers)
