"""The foundation end to end: a real worker, a private RabbitMQ and a private Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import worker_tasks
from tests.infra import ROOT, RabbitNode, WorkerProcess, wait_for

pytestmark = pytest.mark.integration


def test_a_task_delayed_from_a_web_app_returns_its_result(worker: WorkerProcess) -> None:
    result = worker_tasks.add.delay(2, 40)
    assert result.get(timeout=20) == 42


def test_a_task_delayed_from_another_process_returns_its_result(
    worker: WorkerProcess, broker_url: str, result_backend: str
) -> None:
    # Given a producer that is a separate Python process, as a web app would be
    code = "from tests.worker_tasks import add\nprint(add.delay(20, 22).get(timeout=20))\n"
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


def test_every_task_queue_is_quorum_with_a_delivery_limit_and_dead_lettering(
    worker: WorkerProcess, rabbit: RabbitNode
) -> None:
    queues = rabbit.queues()
    for name in ("default", "batch", "scheduled", "priority"):
        assert queues[name]["type"] == "quorum", name
        arguments = queues[name]["arguments"]
        assert arguments["x-delivery-limit"] == 10, name
        assert arguments["x-dead-letter-exchange"] == "conveyor.dlx", name
    assert queues["conveyor.dead_letter"]["type"] == "quorum"
    exchanges = dict(
        line.split("\t") for line in rabbit.ctl("list_exchanges", "name", "type", "-q").splitlines()
    )
    assert exchanges["conveyor"] == "topic"
    assert exchanges["conveyor.dlx"] == "topic"


def test_inspect_conf_shows_late_acks_and_a_prefetch_of_one(
    worker: WorkerProcess, broker_url: str, result_backend: str
) -> None:
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": result_backend}
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    done = subprocess.run(
        [celery, "-A", "tasks", "inspect", "conf", "--json", "--destination", worker.node],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    conf = json.loads(done.stdout)[worker.node]
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["accept_content"] == ["json"]


def test_a_countdown_task_waits_in_the_broker_not_in_the_worker(
    worker: WorkerProcess, conveyor_app
) -> None:
    # Given a task due in 3 seconds
    sent_at = time.time()
    result = worker_tasks.ran_at.apply_async(countdown=3)

    # While it waits, the worker holds nothing: no scheduled (ETA) and no reserved request
    time.sleep(1.5)
    inspect = conveyor_app.control.inspect(destination=[worker.node], timeout=5)
    assert inspect.scheduled() == {worker.node: []}
    assert inspect.reserved() == {worker.node: []}

    # Then the broker delivers it on time: not early, and within the 1 s resolution
    started = result.get(timeout=20)
    assert 3.0 <= started - sent_at < 5.0


def test_a_sub_second_countdown_is_rounded_up_not_rejected(worker: WorkerProcess) -> None:
    sent_at = time.time()
    started = worker_tasks.ran_at.apply_async(countdown=0.4).get(timeout=20)
    assert 0.4 <= started - sent_at < 3.0


def test_a_pool_process_killed_mid_task_loses_no_task(worker: WorkerProcess, ledger) -> None:
    # Given a task running in a pool process
    result = worker_tasks.record_and_sleep.delay("killed", 3)
    pid = int(wait_for(lambda: ledger.get("pid:killed:1"), 20, what="the task to start"))

    # When that process is killed as the OOM killer would
    os.kill(pid, signal.SIGKILL)

    # Then the task is delivered again and runs to completion
    assert result.get(timeout=60) == 2
    assert ledger.get("runs:killed") == "2"
    assert int(ledger.get("pid:killed:2")) != pid


def test_a_publish_with_the_broker_down_fails_clearly_and_quickly(result_backend: str) -> None:
    # Given a broker address where nothing listens
    from port_for import get_port

    dead = f"amqp://guest:guest@127.0.0.1:{get_port(None)}//"
    code = "from tests.worker_tasks import add\nadd.delay(1, 2)\n"
    env = {**os.environ, "CELERY_BROKER_URL": dead, "CELERY_RESULT_BACKEND": result_backend}

    # When a producer publishes, it gets an error rather than a hang
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started

    assert done.returncode != 0
    assert "OperationalError" in done.stderr
    assert "Connection refused" in done.stderr
    assert elapsed < 15, f"publish took {elapsed:.1f}s to fail"
