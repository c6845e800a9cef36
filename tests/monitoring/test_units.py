"""Plain functions of the monitoring side: no broker, no worker."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from kombu import Queue
from prometheus_client import CollectorRegistry

from monitoring.exporter.events import NameLabels, TaskEvents, _exception_type, configured_queues
from monitoring.flower import access_problem, is_loopback
from tests.infra import ROOT
from workers import logs


# --- Flower's guard ------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_flower_may_run_without_auth_on_loopback(address: str) -> None:
    assert is_loopback(address)
    assert access_problem(address=address, unix_socket="", basic_auth=None, auth="") is None


@pytest.mark.parametrize("address", ["", "0.0.0.0", "::", "10.1.2.3", "flower.example"])
def test_flower_refuses_every_other_address_without_auth(address: str) -> None:
    problem = access_problem(address=address, unix_socket="", basic_auth=None, auth="")
    assert problem and "without authentication" in problem


def test_flower_with_basic_auth_or_oauth_may_listen_anywhere() -> None:
    assert access_problem(address="0.0.0.0", unix_socket="", basic_auth=["a:b"], auth="") is None
    assert (
        access_problem(address="", unix_socket="", basic_auth=None, auth=r".*@corp\.example")
        is None
    )


def test_a_malformed_basic_auth_value_is_refused() -> None:
    for value in (["nopassword"], [":onlypassword"]):
        problem = access_problem(address="0.0.0.0", unix_socket="", basic_auth=value, auth="")
        assert problem and "user:password" in problem


def test_flower_exits_at_start_when_exposed_without_auth() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    done = subprocess.run(
        [celery, "-A", "tasks", "flower", "--conf=flowerconfig.py", "--address=0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to start: Flower would serve 0.0.0.0 without authentication" in done.stderr


# --- Logs ------------------------------------------------------------------------------------
def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("tasks.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    for key, value in fields.items():
        setattr(record, key, value)
    return record


def test_a_json_log_line_carries_the_task_fields() -> None:
    line = logs.json_formatter().format(
        _record(task_id="t-1", task_name="webhooks.deliver", queue="default", retries=2,
                batch_id="b-9")
    )  # fmt: skip
    data = json.loads(line)
    assert data["message"] == "hello world"
    assert data["level"] == "INFO"
    assert data["logger"] == "tasks.x"
    assert data["task_id"] == "t-1"
    assert (data["task_name"], data["queue"]) == ("webhooks.deliver", "default")
    assert (data["retries"], data["batch_id"]) == (2, "b-9")


def test_a_json_log_line_outside_a_task_has_no_task_fields() -> None:
    data = json.loads(logs.json_formatter().format(_record()))
    assert "task_id" not in data and data["message"] == "hello world"


def test_a_key_value_line_has_dashes_outside_a_task_and_a_batch_only_when_there_is_one() -> None:
    formatter = logs.KeyValueFormatter()
    outside = formatter.format(_record())
    assert "task_id=- task_name=- queue=- retries=- hello world" in outside
    assert "batch_id" not in outside
    inside = formatter.format(_record(task_id="t-1", task_name="n", queue="q", retries=0,
                                      batch_id="b-1"))  # fmt: skip
    assert "task_id=t-1 task_name=n queue=q retries=0 batch_id=b-1 hello world" in inside


@pytest.mark.parametrize("formatter", [logs.KeyValueFormatter, logs.json_formatter])
def test_log_lines_and_their_tracebacks_have_passwords_masked(formatter: Any) -> None:
    try:
        raise ConnectionError("cannot reach redis://:hunter2@cache:6379/0 (password=hunter2)")
    except ConnectionError:
        record = logging.LogRecord(
            "tasks.x", logging.ERROR, __file__, 1, "broker %s", ("amqp://app:s3cret@mq//",),
            sys.exc_info(),
        )  # fmt: skip
    line = formatter().format(record)
    assert "hunter2" not in line and "s3cret" not in line
    assert "amqp://app:********@mq//" in line and "Traceback" in line


def test_one_variable_chooses_the_log_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_LOG_FORMAT", "json")
    logs.configure("INFO")
    handler = logging.getLogger().handlers[0]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("conveyor.test").info("x=%d", 1)
    assert json.loads(stream.getvalue())["message"] == "x=1"
    monkeypatch.setenv("CONVEYOR_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="json or keyvalue"):
        logs.configure("INFO")
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


# --- Event bookkeeping of the exporter ---------------------------------------------------------
def _events() -> tuple[TaskEvents, CollectorRegistry]:
    registry = CollectorRegistry()
    queues = [*configured_queues(), Queue("q")]
    return TaskEvents(registry, max_tracked=3, queues=queues), registry


def test_the_queue_label_is_a_declared_queue_or_other() -> None:
    events, registry = _events()
    delayed = "0." * 25 + "1.1.0.default"  # native delayed delivery's routing key
    for n, (queue, routing_key) in enumerate(
        [(None, delayed), ("default", "default"), (None, "batch"), ("celery", "celery")]
    ):
        events.handle({"type": "task-sent", "uuid": str(n), "name": "t", "queue": queue,
                       "routing_key": routing_key})  # fmt: skip
    sent = {
        queue: registry.get_sample_value("conveyor_tasks_sent_total", {"task": "t", "queue": queue})
        for queue in ("default", "batch", "other")
    }
    assert sent == {"default": 2, "batch": 1, "other": 1}


def test_a_rejected_task_is_counted_under_the_queue_it_came_from() -> None:
    events, registry = _events()
    events.handle({"type": "task-received", "uuid": "a", "name": "t", "routing_key": "batch"})
    events.handle({"type": "task-started", "uuid": "a"})
    events.handle({"type": "task-rejected", "uuid": "a"})
    assert registry.get_sample_value("conveyor_tasks_rejected_total", {"queue": "batch"}) == 1


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("ValueError('https://user:pw@hooks.example/x')", "ValueError"),
        ("<HTTPError 410: 'Gone'>", "HTTPError"),
        ("tasks.webhooks.DeliveryRejected('x')", "tasks.webhooks.DeliveryRejected"),
        ("KeyError", "KeyError"),
        ("https://hooks.example/x answered 500", "unknown"),
        ("", "unknown"),
    ],
)
def test_the_exception_label_is_the_type_never_the_message(text: str, label: str) -> None:
    assert _exception_type(text) == label


def test_past_the_limit_new_names_are_labelled_other() -> None:
    names = NameLabels(limit=2)
    assert [names(n) for n in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


def test_the_wait_is_measured_from_sent_to_started() -> None:
    events, registry = _events()
    events.handle({"type": "task-sent", "uuid": "a", "name": "t", "queue": "default",
                   "timestamp": 100.0})  # fmt: skip
    assert events.waiting_by_queue(now=104.0) == {"default": (1, 4.0)}
    events.handle({"type": "task-started", "uuid": "a", "timestamp": 102.5})
    assert events.waiting_by_queue(now=110.0) == {}
    labels = {"task": "t", "queue": "default"}
    assert registry.get_sample_value("conveyor_task_wait_seconds_count", labels) == 1
    assert registry.get_sample_value("conveyor_task_wait_seconds_sum", labels) == 2.5


def test_a_task_sent_event_that_arrives_after_the_start_is_not_left_waiting() -> None:
    events, registry = _events()
    # task-sent goes out after the confirm, on another connection: the worker may win the race
    events.handle({"type": "task-started", "uuid": "a", "timestamp": 100.2})
    events.handle({"type": "task-sent", "uuid": "a", "name": "t", "queue": "default",
                   "timestamp": 100.0})  # fmt: skip
    assert events.waiting_by_queue(now=500.0) == {}
    labels = {"task": "t", "queue": "default"}
    assert registry.get_sample_value("conveyor_task_wait_seconds_count", labels) == 1
    assert registry.get_sample_value("conveyor_task_wait_seconds_sum", labels) == pytest.approx(0.2)


def test_a_countdown_task_waits_only_from_its_due_time() -> None:
    events, _ = _events()
    events.handle({"type": "task-sent", "uuid": "a", "name": "t", "queue": "default",
                   "timestamp": 100.0, "eta": "1970-01-01T00:03:20+00:00"})  # fmt: skip
    assert events.waiting_by_queue(now=150.0) == {}  # due at 200
    assert events.waiting_by_queue(now=230.0) == {"default": (1, 30.0)}


def test_failures_and_retries_are_counted_by_task_and_exception_type() -> None:
    events, registry = _events()
    events.handle({"type": "task-sent", "uuid": "a", "name": "t", "queue": "default"})
    events.handle({"type": "task-retried", "uuid": "a", "exception": "Retry('later')"})
    events.handle({"type": "task-failed", "uuid": "a", "exception": "ValueError('boom')"})
    assert registry.get_sample_value("conveyor_tasks_retried_total", {"task": "t"}) == 1
    assert (
        registry.get_sample_value(
            "conveyor_tasks_failed_total", {"task": "t", "exception": "ValueError"}
        )
        == 1
    )
    assert _exception_type("") == "unknown"


def test_tracking_is_bounded_and_says_what_it_forgot() -> None:
    events, registry = _events()
    for n in range(5):
        events.handle({"type": "task-sent", "uuid": str(n), "name": "t", "queue": "q",
                       "timestamp": float(n)})  # fmt: skip
    assert events.waiting_by_queue(now=10.0) == {"q": (3, 8.0)}
    assert registry.get_sample_value("conveyor_exporter_forgotten_tasks_total") == 2


def test_an_empty_queue_on_the_broker_clears_tasks_that_left_without_an_event() -> None:
    events, _ = _events()
    events.handle({"type": "task-sent", "uuid": "a", "name": "t", "queue": "q", "timestamp": 1.0})
    # Seen by the exporter before the broker was read: gone from the queue (dead-lettered)
    events.nothing_ready_in("q", observed_at=1e12)
    assert events.waiting_by_queue(now=1e12) == {}
