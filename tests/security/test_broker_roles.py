"""Least-privilege broker roles on a private node, provisioned by deploy/rabbitmq/provision.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.infra import (
    RABBITMQ_BIN,
    ROOT,
    ManagedRabbitNode,
    RabbitNode,
    WorkerProcess,
    get_port,
    wait_for,
)
from tests.monitoring.conftest import ServiceProcess, project_command, sample, scrape
from tests.security.beat import beat_sends_a_task_the_worker_runs

pytestmark = pytest.mark.integration

PASSWORDS = {
    "CONVEYOR_ADMIN_PASSWORD": "adm-pw-1",
    "CONVEYOR_PRODUCER_PASSWORD": "prd-pw-2",
    "CONVEYOR_WORKER_PASSWORD": "wrk-pw-3",
    "CONVEYOR_MONITOR_PASSWORD": "mon-pw-4",
    "CONVEYOR_EXPORTER_PASSWORD": "exp-pw-5",
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


def provisioned(rabbit: RabbitNode) -> RabbitNode:
    """Apply the definitions to a running node with deploy/rabbitmq/provision.sh."""
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
    return rabbit


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedRabbitNode]:
    # With the management API, which the monitor and exporter roles read with their tag
    rabbit = ManagedRabbitNode(tmp_path_factory.mktemp("roles-rabbit")).start()
    try:
        yield provisioned(rabbit)
    finally:
        rabbit.stop()


def url(node: RabbitNode, role: str) -> str:
    password = PASSWORDS[f"CONVEYOR_{role.upper()}_PASSWORD"]
    return f"amqp://conveyor-{role}:{password}@127.0.0.1:{node.port}/conveyor"


def producer_env(node: RabbitNode, result_backend: str) -> dict[str, str]:
    """A producer-role client's environment: it declares nothing, as a web app's must not."""
    return {
        **os.environ,
        "CELERY_BROKER_URL": url(node, "producer"),
        "CELERY_RESULT_BACKEND": result_backend,
        "CONVEYOR_DECLARE_ON_PUBLISH": "false",
    }


def worker_role(node: RabbitNode, result_backend: str, workdir: Path, name: str) -> WorkerProcess:
    return WorkerProcess(
        broker_url=url(node, "worker"), result_backend=result_backend, workdir=workdir, name=name
    ).start()


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


def test_a_delayed_task_can_be_sent_before_any_worker_has_run(
    tmp_path: Path, result_backend: str
) -> None:
    # Given a fresh node that only the definitions have touched
    rabbit = RabbitNode(tmp_path / "fresh-rabbit").start()
    try:
        provisioned(rabbit)
        env = producer_env(rabbit, result_backend)
        # When a producer-role client sends a countdown task (confirmed by the broker)
        send = (
            "from tests.worker_tasks import add\nprint(add.apply_async((20, 22), countdown=3).id)\n"
        )
        sent = subprocess.run(
            [sys.executable, "-c", send], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()

        # Then the broker holds it (in a delay queue until due, then in its task queue) ...
        def held() -> int:
            listed = rabbit.ctl("list_queues", "-p", "conveyor", "name", "messages", "-q")
            return sum(
                int(line.split("\t")[1])
                for line in listed.splitlines()
                if line.startswith(("celery_delayed_", "default\t"))
            )

        wait_for(lambda: held() == 1, timeout=15, what="the delayed message in a queue")
        # ... and a worker started afterwards runs it when it is due
        worker = worker_role(rabbit, result_backend, tmp_path, "fresh-worker")
        try:
            get = f"from tasks import app\nprint(app.AsyncResult({task_id!r}).get(timeout=60))\n"
            done = subprocess.run(
                [sys.executable, "-c", get], cwd=ROOT, env=env, capture_output=True, text=True,
                timeout=90,
            )  # fmt: skip
            assert done.stdout.strip() == "42", done.stderr
        finally:
            worker.stop()
        # and the worker's own declarations agreed with the definitions (same arguments)
        assert "native delayed delivery setup failed" not in worker.log()
        assert "PRECONDITION_FAILED" not in worker.log()
    finally:
        rabbit.stop()


def test_the_worker_role_runs_tasks_that_the_producer_role_sends(
    node: RabbitNode, result_backend: str, tmp_path: Path
) -> None:
    worker = worker_role(node, result_backend, tmp_path, "role-worker")
    try:
        env = producer_env(node, result_backend)
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


def publish(node: RabbitNode, role: str, exchange: str) -> None:
    """Publish one message to `exchange` as `role`, waiting for the broker's confirm."""
    with Connection(url(node, role), transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(exchange, type="topic"))
        producer.publish({"x": 1}, routing_key="default", declare=[])


#: Every exchange a Celery client could use to make a worker act: tasks, delayed tasks,
#: events, remote control, and the default exchange (straight into a queue).
EXCHANGES = ("conveyor", "celery_delayed_27", "celeryev", "celery.pidbox", "")


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_the_exporter_role_cannot_publish_anywhere(node: RabbitNode, exchange: str) -> None:
    refused(lambda: publish(node, "exporter", exchange))


@pytest.mark.parametrize("exchange", [e for e in EXCHANGES if e != "celery.pidbox"])
def test_the_monitor_role_cannot_publish_except_inspect_and_control(
    node: RabbitNode, exchange: str
) -> None:
    refused(lambda: publish(node, "monitor", exchange))


def test_the_producer_role_cannot_send_control_commands(node: RabbitNode) -> None:
    refused(lambda: publish(node, "producer", "celery.pidbox"))


def test_the_monitor_role_cannot_read_task_queues(node: RabbitNode) -> None:
    with Connection(url(node, "monitor")) as connection:
        refused(lambda: Queue("default", no_declare=True).bind(connection.channel()).get())


def test_the_exporter_runs_on_the_read_only_exporter_role(
    node: ManagedRabbitNode, result_backend: str, tmp_path: Path
) -> None:
    # Given a worker, and the exporter with the exporter role for AMQP and the management API
    worker = worker_role(node, result_backend, tmp_path, "exporter-role-worker")
    port = get_port(None)
    password = PASSWORDS["CONVEYOR_EXPORTER_PASSWORD"]
    exporter = ServiceProcess(
        project_command("exporter", "--address=127.0.0.1", f"--port={port}"),
        {
            "CELERY_BROKER_URL": url(node, "exporter"),
            "CELERY_RESULT_BACKEND": result_backend,
            "CONVEYOR_RABBITMQ_API": node.api_url.replace(
                "guest:guest", f"conveyor-exporter:{password}"
            ),
        },
        tmp_path / "exporter.log",
    ).start()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        exporter.wait_for_http(metrics_url)
        wait_for(
            lambda: sample(scrape(metrics_url), "conveyor_exporter_events_connected") == 1,
            timeout=30, what="the exporter's event stream",
        )  # fmt: skip
        # When a producer sends a task
        env = producer_env(node, result_backend)
        done = subprocess.run(
            [sys.executable, "-c", PRODUCE], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.stdout.strip() == "9", done.stderr

        # Then the exporter saw it through events, and read the queues from the management API
        def succeeded() -> float:
            found = sample(scrape(metrics_url), "conveyor_tasks_succeeded_total", task="tests.add")
            return found or 0

        wait_for(lambda: succeeded() >= 1, timeout=30, what="the task's events in the exporter")
        metrics = scrape(metrics_url)
        assert sample(metrics, "conveyor_broker_up") == 1
        assert sample(metrics, "conveyor_queue_messages_unacked", queue="default") is not None
    finally:
        exporter.stop()
        worker.stop()
    assert "ACCESS_REFUSED" not in exporter.log()
    assert "event stream lost" not in exporter.log()
    # And the same credential reads queue depth but can neither consume a task queue
    with Connection(url(node, "exporter")) as connection:
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


def test_beat_runs_on_the_worker_role(
    node: RabbitNode, result_backend: str, redis_url: str, tmp_path: Path
) -> None:
    worker = worker_role(node, result_backend, tmp_path, "beat-role-worker")
    try:
        log = beat_sends_a_task_the_worker_runs(
            worker, url(node, "worker"), redis_url, tmp_path / "beat", {}
        )
    finally:
        worker.stop()
    assert "ACCESS_REFUSED" not in log
