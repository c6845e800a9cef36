"""workers/failover.py's delayed-delivery step, on a stand-in consumer (no broker).

The declarations themselves are replaced by recorders or by the errors a broker raises; the
end-to-end behaviour (resuming within 5 s after a node kill) is tests/chaos/test_cluster.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from amqp.exceptions import ConnectionForced, PreconditionFailed
from celery.worker.consumer import delayed_delivery
from kombu import Connection

import workers.failover
from tasks.celery_app import app
from workers.failover import ClusterDelayedDelivery

URL = "amqp://conveyor-worker:s3cret@10.0.0.2:5672/conveyor"


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """What the step reads of Celery's consumer: the app, its live connection, its errors."""

    def no_other_connection(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the step must use the consumer's own connection")

    monkeypatch.setattr(app, "connection_for_write", no_other_connection)
    connection = Connection(URL)  # never opened: every declaration below is replaced
    return SimpleNamespace(
        app=app, connection=connection, connection_errors=connection.connection_errors
    )


def replace(
    monkeypatch: pytest.MonkeyPatch,
    *,
    declare: Callable[..., None] | None = None,
    bind: Callable[..., None] | None = None,
) -> None:
    monkeypatch.setattr(
        workers.failover,
        "declare_native_delayed_delivery_exchanges_and_queues",
        declare or (lambda connection, queue_type: None),
    )
    monkeypatch.setattr(
        delayed_delivery,
        "bind_queue_to_native_delayed_delivery_exchange",
        bind or (lambda connection, queue: None),
    )


def fail_with(error: BaseException) -> Callable[..., None]:
    def fail(*args: Any) -> None:
        raise error

    return fail


def test_the_step_declares_once_over_the_consumers_own_connection(
    consumer: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared: list[tuple[Any, str]] = []
    bound: list[tuple[Any, str]] = []
    replace(
        monkeypatch,
        declare=lambda connection, queue_type: declared.append((connection, queue_type)),
        bind=lambda connection, queue: bound.append((connection, queue.name)),
    )

    ClusterDelayedDelivery(consumer).start(consumer)

    assert declared == [(consumer.connection, app.conf.broker_native_delayed_delivery_queue_type)]
    task_queues = {queue.name for queue in app.conf.task_queues}
    assert {name for _, name in bound} == task_queues
    assert {id(connection) for connection, _ in bound} == {id(consumer.connection)}


@pytest.mark.parametrize(
    "error", [ConnectionResetError(104, "reset by peer"), ConnectionForced("node shutdown")]
)
def test_a_connection_error_while_declaring_propagates(
    consumer: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    replace(monkeypatch, declare=fail_with(error))

    # The consumer restarts on such an error and fails over to the next node.
    with pytest.raises(type(error)) as raised:
        ClusterDelayedDelivery(consumer).start(consumer)
    assert raised.value is error


def test_a_connection_error_while_binding_propagates_as_itself_not_grouped(
    consumer: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery's binding helper collects a non-OSError failure per queue into an ExceptionGroup,
    # which the consumer would not recognise as a lost connection.
    lost = ConnectionForced("node shutdown")
    replace(monkeypatch, bind=fail_with(lost))

    with pytest.raises(ConnectionForced) as raised:
        ClusterDelayedDelivery(consumer).start(consumer)
    assert raised.value is lost
    assert isinstance(raised.value, consumer.connection_errors)


@pytest.mark.parametrize("where", ["declare", "bind"])
def test_any_other_error_is_logged_as_critical_and_consumption_continues(
    consumer: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    # A channel error, e.g. a queue re-declared with other arguments.
    error = PreconditionFailed("inequivalent arg 'x-queue-type'")
    replace(monkeypatch, **{where: fail_with(error)})

    with caplog.at_level(logging.INFO, logger="workers.failover"):
        assert ClusterDelayedDelivery(consumer).start(consumer) is None

    (record,) = [r for r in caplog.records if r.name == "workers.failover"]
    assert record.levelno == logging.CRITICAL
    message = record.getMessage()
    assert "native delayed delivery setup failed on amqp://conveyor-worker:**@10.0.0.2" in message
    assert "inequivalent arg" in message
    assert "countdown/ETA tasks will not be delivered" in message
    assert "s3cret" not in message
