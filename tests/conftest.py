"""Fixtures: private RabbitMQ and Redis nodes, the configured app, and real worker processes.

Set CELERY_BROKER_URL / CELERY_RESULT_BACKEND to run against existing services instead of
private nodes (tests that kill or restart a node always use private ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import redis
from pytest_redis import factories as redis_factories

from tests.infra import RabbitNode, WorkerProcess, redis_server_available, require

#: Private Redis on a free port; db 0 holds results, db 15 the tests' execution ledger.
redis_node = redis_factories.redis_proc(port=None, db_count=16)

LEDGER_DB = 15


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A private RabbitMQ node for the whole session."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbit")).start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def broker_url(request: pytest.FixtureRequest) -> str:
    given = os.environ.get("CELERY_BROKER_URL")
    if given:
        return given
    node: RabbitNode = request.getfixturevalue("rabbit")
    return node.url


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """Base URL of the Redis to use, without a database number."""
    given = os.environ.get("CELERY_RESULT_BACKEND")
    if given:
        return given.rsplit("/", 1)[0] if given.count("/") > 2 else given
    require(redis_server_available(), "redis-server not found (apt-get install redis-server)")
    proc = request.getfixturevalue("redis_node")
    return f"redis://{proc.host}:{proc.port}"


@pytest.fixture(scope="session")
def result_backend(redis_url: str) -> str:
    return f"{redis_url}/0"


@pytest.fixture(scope="session")
def ledger_url(redis_url: str) -> str:
    return f"{redis_url}/{LEDGER_DB}"


@pytest.fixture(scope="session")
def conveyor_app(broker_url: str, result_backend: str):  # type: ignore[no-untyped-def]
    """The project's app (tasks.app), pointed at the test broker and backend."""
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["CELERY_RESULT_BACKEND"] = result_backend
    from tasks import app

    app.conf.update(broker_url=broker_url, result_backend=result_backend)
    import tests.worker_tasks  # noqa: F401  registers the test tasks on the producer side

    return app


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(ledger_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


#: start_worker(name, broker_url=..., ...): a running worker for a `with` block (see below).
StartWorker = Callable[..., AbstractContextManager[WorkerProcess]]


@pytest.fixture(scope="session")
def start_worker(
    tmp_path_factory: pytest.TempPathFactory, result_backend: str, ledger_url: str
) -> StartWorker:
    """The one way the tests run a worker: a real `celery -A tasks worker` process.

    ``with start_worker(name, broker_url=url) as process:`` starts it with the suite's result
    backend and ledger and stops it at the end of the block. Options: `include` (test task
    modules besides tests.worker_tasks), `env`, `concurrency`, `workdir` (a fresh directory by
    default) and `timeout` (seconds to become ready).
    """

    @contextmanager
    def run(
        name: str,
        *,
        broker_url: str,
        include: Sequence[str] = (),
        env: dict[str, str] | None = None,
        concurrency: int = 2,
        workdir: Path | None = None,
        timeout: float = 60,
    ) -> Iterator[WorkerProcess]:
        process = WorkerProcess(
            broker_url=broker_url,
            result_backend=result_backend,
            workdir=workdir or tmp_path_factory.mktemp(name),
            name=name,
            concurrency=concurrency,
            include=",".join(("tests.worker_tasks", *include)),
            env={"CONVEYOR_TEST_LEDGER_URL": ledger_url, **(env or {})},
        )
        try:
            yield process.start(timeout)
        finally:
            process.stop()

    return run


@pytest.fixture(scope="module")
def worker(
    conveyor_app,  # type: ignore[no-untyped-def]
    broker_url: str,
    start_worker: StartWorker,
) -> Iterator[WorkerProcess]:
    """A real worker process shared by the tests of one module."""
    with start_worker("worker", broker_url=broker_url) as process:
        yield process
