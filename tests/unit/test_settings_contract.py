"""The settings every later capability relies on. Changing one of these is a design decision."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import celeryconfig
from tasks import app


def test_delivery_is_late_acked_with_a_prefetch_of_one() -> None:
    assert app.conf.task_acks_late is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_reject_on_worker_lost is True
    # Cancelling on connection loss kills tasks between an effect and its done-marker.
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_only_json_is_accepted() -> None:
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"


def test_every_task_queue_is_quorum_delivery_limited_and_dead_lettered() -> None:
    queues = {queue.name: queue for queue in app.conf.task_queues}
    assert set(queues) == {"default", "batch", "scheduled", "priority"}
    for queue in queues.values():
        assert queue.exchange.type == "topic", "native delayed delivery needs a non-direct exchange"
        assert queue.queue_arguments["x-queue-type"] == "quorum"
        assert queue.queue_arguments["x-delivery-limit"] > 0
        assert queue.queue_arguments["x-dead-letter-exchange"] == "conveyor.dlx"
        assert queue.durable


def test_publishes_are_confirmed_and_bounded() -> None:
    assert app.conf.broker_transport_options["confirm_publish"] is True
    assert app.conf.task_publish_retry_policy["max_retries"] <= 5
    assert app.conf.broker_pool_acquire_timeout is not None
    assert 0 < app.conf.conveyor_publish_timeout <= 30


def test_time_limits_sit_below_the_brokers_consumer_timeout() -> None:
    consumer_timeout_s = 1800  # RabbitMQ's default, set explicitly in deploy/rabbitmq
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit < consumer_timeout_s


def test_events_are_on_for_flower() -> None:
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is True


def test_the_app_never_runs_tasks_eagerly() -> None:
    assert app.conf.task_always_eager is False


def test_a_setting_can_be_overridden_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "600")
    monkeypatch.setenv("CELERY_WORKER_CONCURRENCY", "3")
    try:
        reloaded = importlib.reload(celeryconfig)
        assert reloaded.task_time_limit == 600
        assert reloaded.worker_concurrency == 3
    finally:
        monkeypatch.undo()
        importlib.reload(celeryconfig)


def test_an_empty_broker_url_is_an_error_not_a_fallback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import celeryconfig"],
        env={"CELERY_BROKER_URL": " ", "PATH": ""},
        capture_output=True,
        text=True,
        cwd=str(__import__("tests.infra", fromlist=["ROOT"]).ROOT),
    )
    assert done.returncode != 0
    assert "CELERY_BROKER_URL is set but empty" in done.stderr


def test_results_use_the_backend_that_subscribes_only_when_waited_on() -> None:
    from urllib.parse import urlsplit

    from core.results import RedisBackend

    backend = app.backend
    assert type(backend) is RedisBackend
    # Selected as a class, it still connects where result_backend says.
    url = urlsplit(app.conf.result_backend)
    assert (backend.connparams["host"], backend.connparams["port"]) == (url.hostname, url.port)


def test_tasks_run_in_processes_so_the_hard_time_limit_can_kill_them() -> None:
    assert app.conf.worker_pool == "prefork"
    assert app.conf.worker_max_memory_per_child
