"""The exporter's labels stay within closed sets, and Flower shows a waiting retry as RETRY."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import CeleryError

from tasks.batch.store import FINAL_STATES
from tests.infra import WorkerProcess, wait_for
from tests.monitoring.conftest import FlowerInstance, scrape
from tests.monitoring.test_exporter import QUEUES
from tests.monitoring.test_flower import get

pytestmark = pytest.mark.integration

NAME = re.compile(r"^[A-Za-z_][\w.]*$")
#: Label -> the values it may take (a set), or the form of a name (a pattern): names come
#: from code (tasks, exceptions, reasons, batch handlers, schedule entries) and ids from
#: Conveyor (batches), never from a message or an error text. docs/monitoring.md lists them.
CLOSED_SETS: dict[str, set[str] | re.Pattern[str]] = {
    "queue": {*QUEUES, "other"},
    "task": NAME,
    "exception": NAME,
    "reason": NAME,
    "state": {"pending", "running", *FINAL_STATES},
    "outcome": {"succeeded", "failed", "skipped", "pending"},
    "handler": NAME,
    "batch_id": re.compile(r"^[\w-]+$"),
    "entry": re.compile(r"^[\w.:-]+$"),
    # A RabbitMQ node's name: as many values as the cluster has nodes.
    "node": re.compile(r"^[\w.-]+@[\w.-]+$"),
}


def out_of_set(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[str]:
    """Every conveyor_* label value outside its closed set, or of an unexpected label."""
    wrong = []
    for name, labels in metrics:
        if not name.startswith("conveyor_"):
            continue
        for label, value in labels:
            if label != "le" and not in_set(value, CLOSED_SETS.get(label)):  # le: fixed buckets
                wrong.append(f"{name}: {label}={value}")
    return wrong


def in_set(value: str, allowed: set[str] | re.Pattern[str] | None) -> bool:
    if isinstance(allowed, re.Pattern):
        return bool(allowed.match(value))
    return allowed is not None and value in allowed


def test_every_label_of_every_metric_stays_in_its_closed_set(
    monitored_worker: WorkerProcess, producer: Celery, exporter: str
) -> None:
    # When tasks retry (through native delayed delivery), wait for a countdown, fail with a
    # URL in their error, run out of retries (rejected to the dead-letter queue), and an
    # unknown task is refused by the worker
    url = "https://user:secret@hooks.example/deliveries/42"
    calls = {
        "retry": producer.send_task("tests.retry_once"),
        "delayed": producer.send_task("tests.add", args=(1, 2), countdown=1),
        "fails": producer.send_task("tests.fail", args=(f"POST {url} answered 500",)),
        "unreachable": producer.send_task("tests.fail_unreachable", args=(url,)),
        "exhausted": producer.send_task("tests.always_retry"),
    }
    producer.send_task("default.no_such_task")
    assert calls["retry"].get(timeout=30) == 1
    assert calls["delayed"].get(timeout=30) == 3
    for failing in ("fails", "unreachable", "exhausted"):
        with pytest.raises(Exception) as raised:
            calls[failing].get(timeout=30)
        assert not isinstance(raised.value, CeleryError), failing

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        metrics = scrape(exporter)
        rejected = {
            labels: value
            for (name, labels), value in metrics.items()
            if name == "conveyor_tasks_rejected_total"
        }
        failed = (("exception", "Unreachable"), ("task", "tests.fail_unreachable"))
        unreachable = ("conveyor_tasks_failed_total", failed)
        return metrics if rejected and unreachable in metrics else None

    metrics = wait_for(counted, 20, interval=0.5, what="the rejection and failures counted")

    # Then every label value of every conveyor_* metric is in its closed set
    assert out_of_set(metrics) == []
    assert not [key for key in metrics if "://" in repr(key)], "a URL reached a label"
    # And the figures are attributed to the queue the tasks came from
    rejected = {dict(labels)["queue"] for (name, labels) in metrics
                if name == "conveyor_tasks_rejected_total"}  # fmt: skip
    assert rejected == {"default"}
    sent_to = {dict(labels)["queue"] for (name, labels) in metrics
               if name == "conveyor_tasks_sent_total"}  # fmt: skip
    assert "default" in sent_to and sent_to <= {*QUEUES, "other"}


def flower_task(flower: FlowerInstance, task_id: str) -> dict[str, Any] | None:
    status, body = get(f"{flower.url}/api/task/info/{task_id}")
    return json.loads(body) if status == 200 else None


def test_flower_shows_a_task_waiting_for_its_retry_as_retry_until_it_runs_again(
    monitored_worker: WorkerProcess, producer: Celery, flower: FlowerInstance
) -> None:
    # Given a task that asks to be retried 6 s later
    result = producer.send_task("tests.retry_later", args=(6,))

    # When Flower has seen the retry
    def retrying() -> bool:
        info = flower_task(flower, result.id)
        return bool(info and info["state"] == "RETRY")

    wait_for(retrying, 15, interval=0.1, what="Flower to show RETRY")
    assert result.state == "RETRY"

    # Then it stays RETRY while the task waits out its countdown (the retry's own task-sent
    # event arrives after task-retried)
    seen = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        info = flower_task(flower, result.id)
        assert info is not None
        seen.append(info["state"])
        time.sleep(0.2)
    assert set(seen) == {"RETRY"}, seen

    # And the next attempt moves it on, to SUCCESS
    assert result.get(timeout=30) == 1
    wait_for(
        lambda: (flower_task(flower, result.id) or {}).get("state") == "SUCCESS",
        10,
        interval=0.2,
        what="Flower to show SUCCESS",
    )
    info = flower_task(flower, result.id)
    assert info is not None and info["retries"] == 1
