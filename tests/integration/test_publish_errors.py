"""What a web app sees when the broker or the result store fails: kombu's OperationalError or
Celery's BackendGetMetaError, within the documented bounds (README, "Calling a task")."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import BackendGetMetaError
from kombu.exceptions import OperationalError
from port_for import get_port

from core.publisher import BrokerError
from tasks.bulk import BulkPublishError, enqueue_many
from tests.infra import RabbitNode, RedisServer

pytestmark = pytest.mark.integration


def producer_app(broker_url: str, result_backend: str = "redis://127.0.0.1:1/0") -> Celery:
    """A web app's view of Conveyor: the project's configuration and task class."""
    app = Celery("web", set_as_current=False, task_cls="tasks.base:Task")
    app.config_from_object("celeryconfig")
    # Read/write URLs too: Celery prefers CELERY_BROKER_URL (set by the session) to broker_url.
    app.conf.update(
        broker_url=broker_url,
        broker_read_url=broker_url,
        broker_write_url=broker_url,
        result_backend=result_backend,
    )
    app.backend_cls = app.conf.conveyor_result_backend_class
    return app


def raised_within(call: Callable[[], Any]) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        call()
    return raised.value, time.monotonic() - started


@pytest.fixture
def broken_urls(rabbit: RabbitNode) -> dict[str, str]:
    base = f"127.0.0.1:{rabbit.port}"
    return {
        "wrong password": f"amqp://guest:not-the-password@{base}//",
        "missing vhost": f"amqp://guest:guest@{base}/no-such-vhost",
        # What a stopped node looks like to a client: nothing listens on its port.
        "node down": f"amqp://guest:guest@127.0.0.1:{get_port(None)}//",
    }


def test_every_broker_failure_at_publish_is_an_operational_error_within_the_bound(
    broken_urls: dict[str, str],
) -> None:
    for case, url in broken_urls.items():
        app = producer_app(url)

        @app.task(name="tests.web_noop", shared=False)
        def noop() -> None:
            """Never runs: its publish fails."""

        bound = float(app.conf.conveyor_publish_timeout)
        error, took = raised_within(noop.delay)
        assert isinstance(error, OperationalError), f"{case}: {error!r}"
        assert took < bound, f"{case}: {took:.1f} s"
        if case != "node down":  # kombu's own OperationalError after its retries
            assert isinstance(error, BrokerError) and error.__cause__ is not None, case

        error, took = raised_within(lambda: enqueue_many(noop, [()]))
        assert isinstance(error, BulkPublishError), f"bulk, {case}: {error!r}"
        assert isinstance(error, OperationalError) and took < bound, f"bulk, {case}"
        app.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_state_read_answers_or_raises_within_the_bound_when_redis_is_away(
    rabbit: RabbitNode, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery prefers CELERY_RESULT_BACKEND (set by the session) to result_backend.
    monkeypatch.setenv("CELERY_RESULT_BACKEND", f"{private_redis.url}/0")
    app = producer_app(rabbit.url, f"{private_redis.url}/0")
    assert app.backend.connparams["port"] == private_redis.port
    bound = float(app.conf.conveyor_result_read_timeout)
    assert bound <= 5, "a web request must get its answer within a few seconds"
    result = app.AsyncResult("no-such-task")
    assert result.state == "PENDING"  # Redis answers

    # Frozen (SIGSTOP: connections accepted, nothing answered), then stopped (refused)
    private_redis.freeze()
    try:
        error, took = raised_within(lambda: result.state)
        assert isinstance(error, BackendGetMetaError), repr(error)
        assert took < bound + 0.5, f"frozen: {took:.1f} s"
    finally:
        private_redis.thaw()
    private_redis.stop()
    error, took = raised_within(lambda: app.AsyncResult("another-task").state)
    assert isinstance(error, BackendGetMetaError), repr(error)
    assert took < bound + 0.5, f"stopped: {took:.1f} s"
    app.close()
