"""Least-privilege broker roles on a private node, provisioned by deploy/rabbitmq/provision.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.infra import RABBITMQ_BIN, ROOT, RabbitNode, WorkerProcess

pytestmark = pytest.mark.integration

PASSWORDS = {
    "CONVEYOR_ADMIN_PASSWORD": "adm-pw-1",
    "CONVEYOR_PRODUCER_PASSWORD": "prd-pw-2",
    "CONVEYOR_WORKER_PASSWORD": "wrk-pw-3",
    "CONVEYOR_MONITOR_PASSWORD": "mon-pw-4",
}
#: What Flower does with the broker: capture worker events for a few seconds.
WATCH_EVENTS = (
    "import threading\n"
    "from tasks import app\n"
    "seen = set()\n"
    "with app.connection_for_read() as conn:\n"
    "    recv = app.events.Receiver(conn, handlers={'*': lambda e: seen.add(e['type'])})\n"
    "    threading.Timer(5, setattr, (recv, 'should_stop', True)).start()\n"
    "    recv.capture()\n"
    "print(sorted(seen))\n"
)
PRODUCE = "from tests.worker_tasks import add\nprint(add.delay(4, 5).get(timeout=30))\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    rabbit = RabbitNode(tmp_path_factory.mktemp("roles-rabbit")).start()
    env = {
        **os.environ,
        **PASSWORDS,
        "RABBITMQCTL": str(RABBITMQ_BIN / "rabbitmqctl"),
        "PYTHON": sys.executable,
        "DELETE_GUEST": "0",
        **rabbit.executor._envvars,
    }
    subprocess.run(
        [str(ROOT / "deploy/rabbitmq/provision.sh"), "-n", rabbit.node_name],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    yield rabbit
    rabbit.stop()


def url(node: RabbitNode, role: str) -> str:
    password = PASSWORDS[f"CONVEYOR_{role.upper()}_PASSWORD"]
    return f"amqp://conveyor-{role}:{password}@127.0.0.1:{node.port}/conveyor"


def refused(action) -> str:  # type: ignore[no-untyped-def]
    """Run a broker action that must be refused; return the broker's reason."""
    with pytest.raises(Exception) as caught:
        action()
    reason = str(caught.value)
    assert "ACCESS_REFUSED" in reason or "NOT_ALLOWED" in reason, reason
    return reason


def test_provisioning_declares_the_topology(node: RabbitNode) -> None:
    queues = node.ctl("list_queues", "-p", "conveyor", "name", "type", "-q").split("\n")
    names = {line.split("\t")[0]: line.split("\t")[1] for line in queues if line}
    for name in ("default", "batch", "scheduled", "priority", "conveyor.dead_letter"):
        assert names[name] == "quorum"


def test_the_worker_role_runs_tasks_that_the_producer_role_sends(
    node: RabbitNode, result_backend: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(
        broker_url=url(node, "worker"),
        result_backend=result_backend,
        workdir=tmp_path,
        name="role-worker",
    ).start()
    try:
        env = {
            **os.environ,
            "CELERY_BROKER_URL": url(node, "producer"),
            "CELERY_RESULT_BACKEND": result_backend,
            "CONVEYOR_DECLARE_ON_PUBLISH": "false",
        }
        done = subprocess.run(
            [sys.executable, "-c", PRODUCE], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "9"
        # A delayed task goes through the broker's delay queues with the same permissions
        delayed = PRODUCE.replace("add.delay(4, 5)", "add.apply_async((1, 1), countdown=1)")
        done = subprocess.run(
            [sys.executable, "-c", delayed], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.stdout.strip() == "2", done.stderr
        # And the monitor role (Flower, the exporter) can ping the worker and read its events
        monitor_env = {**env, "CELERY_BROKER_URL": url(node, "monitor")}
        ping = subprocess.run(
            [str(Path(sys.executable).with_name("celery")), "-A", "tasks", "inspect", "ping",
             "--destination", worker.node, "--json"],
            cwd=ROOT, env=monitor_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stderr
        assert worker.node in ping.stdout
        events = subprocess.run(
            [sys.executable, "-c", WATCH_EVENTS],
            cwd=ROOT, env=monitor_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert events.returncode == 0, events.stderr
        assert "worker-heartbeat" in events.stdout
    finally:
        worker.stop()
    assert "ACCESS_REFUSED" not in worker.log()


def test_the_producer_role_cannot_consume_purge_or_delete_a_task_queue(node: RabbitNode) -> None:
    with Connection(url(node, "producer")) as connection:
        queue = Queue("default", no_declare=True)
        refused(lambda: queue.bind(connection.channel()).get())
    with Connection(url(node, "producer")) as connection:
        refused(lambda: Queue("default", no_declare=True).bind(connection.channel()).purge())
    with Connection(url(node, "producer")) as connection:
        refused(lambda: Queue("default", no_declare=True).bind(connection.channel()).delete())


def test_the_monitor_role_cannot_publish_tasks_or_read_task_queues(node: RabbitNode) -> None:
    with Connection(url(node, "monitor"), transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.channel(), exchange=Exchange("conveyor", type="topic"))
        refused(lambda: producer.publish({"x": 1}, routing_key="default", declare=[]))
    with Connection(url(node, "monitor")) as connection:
        refused(lambda: Queue("default", no_declare=True).bind(connection.channel()).get())


def test_the_monitor_role_sees_queue_depth_with_a_passive_declare(node: RabbitNode) -> None:
    with Connection(url(node, "monitor")) as connection:
        name, messages, consumers = connection.default_channel.queue_declare(
            "default", passive=True
        )
    assert name == "default"
    assert messages >= 0 and consumers >= 0


def test_guest_cannot_reach_the_conveyor_vhost(node: RabbitNode) -> None:
    with Connection(f"amqp://guest:guest@127.0.0.1:{node.port}/conveyor") as connection:
        refused(lambda: connection.connect())
