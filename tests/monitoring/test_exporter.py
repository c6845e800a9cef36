"""The exporter, the overview command, logs and traces against a real worker and broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from monitoring import queue_stats
from monitoring.exporter.collector import build_registry
from tests.infra import ROOT, ManagedRabbitNode, WorkerProcess, wait_for
from tests.monitoring.conftest import OtlpCollector, families, sample, scrape
from tests.monitoring.test_alert_rules import (
    EXTENSION_METRICS,
    alert_expressions,
    conveyor_metric_names,
    dashboard_expressions,
)

pytestmark = pytest.mark.integration

QUEUES = ("default", "batch", "scheduled", "priority", "conveyor.dead_letter")


def exporter_counts(metrics: dict[Any, float]) -> dict[str, dict[str, int | None]]:
    counts: dict[str, dict[str, int | None]] = {}
    for name in QUEUES:
        ready = sample(metrics, "conveyor_queue_messages_ready", queue=name)
        unacked = sample(metrics, "conveyor_queue_messages_unacked", queue=name)
        consumers = sample(metrics, "conveyor_queue_consumers", queue=name)
        counts[name] = {
            "ready": None if ready is None else int(ready),
            "unacked": None if unacked is None else int(unacked),
            "consumers": None if consumers is None else int(consumers),
        }
    return counts


def broker_counts(rabbit: ManagedRabbitNode) -> dict[str, dict[str, int]]:
    counts = rabbit.queue_counts()
    return {name: counts[name] for name in QUEUES}


def test_metrics_report_the_queue_depths_and_consumers_rabbitmqctl_reports(
    monitored_worker: WorkerProcess,
    managed_rabbit: ManagedRabbitNode,
    producer: Celery,
    exporter: str,
    ledger: Any,
) -> None:
    # Given messages in two queues no worker serves, and more work on `default` than the
    # worker's two processes take at once (two run, unacked; two wait, ready)
    for _ in range(3):
        producer.send_task("batch.not_served", args=())
    for _ in range(2):
        producer.send_task("schedule.not_served", args=())
    running = [producer.send_task("tests.hold", args=("depth",)) for _ in range(4)]
    try:
        # When the broker's figures have settled (quorum queues update them every few seconds)
        settled = {
            "default": {"ready": 2, "unacked": 2, "consumers": 1},
            "batch": {"ready": 3, "unacked": 0, "consumers": 0},
            "scheduled": {"ready": 2, "unacked": 0, "consumers": 0},
        }
        wait_for(
            lambda: {q: broker_counts(managed_rabbit)[q] for q in settled} == settled,
            20,
            interval=0.3,
            what=f"rabbitmqctl to show {settled}",
        )

        # Then /metrics shows rabbitmqctl's figures for every queue (the management API
        # refreshes every second here, so allow it a few)
        wait_for(
            lambda: exporter_counts(scrape(exporter)) == broker_counts(managed_rabbit),
            10,
            interval=0.5,
            what="the exporter to agree with rabbitmqctl",
        )

        # And without the management API, passive declares give the same ready and consumers
        registry, _ = build_registry(producer, None, with_events=False)
        ready = {q: registry.get_sample_value("conveyor_queue_messages_ready", {"queue": q})
                 for q in QUEUES}  # fmt: skip
        assert ready == {q: broker_counts(managed_rabbit)[q]["ready"] for q in QUEUES}
        unacked = registry.get_sample_value("conveyor_queue_messages_unacked", {"queue": "batch"})
        assert unacked is None, "passive declares cannot tell unacked messages"
    finally:
        managed_rabbit.ctl("purge_queue", "batch")
        managed_rabbit.ctl("purge_queue", "scheduled")
        ledger.set("release:depth", 1)
        assert [result.get(timeout=60) for result in running] == [True] * 4


def test_counters_and_waits_follow_the_tasks_a_real_worker_runs(
    monitored_worker: WorkerProcess, producer: Celery, exporter: str
) -> None:
    before = scrape(exporter)

    def delta(metrics: dict[Any, float], name: str, **labels: str) -> float:
        return (sample(metrics, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    # When three tasks succeed, one fails and one retries once and then succeeds
    adds = [producer.send_task("tests.add", args=(n, 1)) for n in range(3)]
    failing = producer.send_task("tests.fail", args=("boom",))
    retrying = producer.send_task("tests.retry_once")
    assert [r.get(timeout=30) for r in adds] == [1, 2, 3]
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=30)
    assert retrying.get(timeout=30) == 1

    # Then the exporter counted each, by task (and exception type for the failure)
    def counted() -> dict[str, float]:
        now = scrape(exporter)
        return {
            "sent add": delta(now, "conveyor_tasks_sent_total", task="tests.add", queue="default"),
            "add": delta(now, "conveyor_tasks_succeeded_total", task="tests.add"),
            "fail": delta(
                now, "conveyor_tasks_failed_total", task="tests.fail", exception="ValueError"
            ),
            "retried": delta(now, "conveyor_tasks_retried_total", task="tests.retry_once"),
            "retry ok": delta(now, "conveyor_tasks_succeeded_total", task="tests.retry_once"),
            "waits": delta(
                now, "conveyor_task_wait_seconds_count", task="tests.add", queue="default"
            ),
        }

    expected = {"sent add": 3, "add": 3, "fail": 1, "retried": 1, "retry ok": 1, "waits": 3}
    wait_for(lambda: counted() == expected, 15, interval=0.5, what=f"counters {expected}")
    # Nothing is left waiting on the queues the worker serves
    metrics = scrape(exporter)
    assert sample(metrics, "conveyor_tasks_waiting", queue="default") == 0
    assert sample(metrics, "conveyor_exporter_events_connected") == 1


def test_a_dead_lettered_message_shows_in_the_dead_letter_gauge(
    monitored_worker: WorkerProcess,
    managed_rabbit: ManagedRabbitNode,
    producer: Celery,
    exporter: str,
) -> None:
    before = broker_counts(managed_rabbit)["conveyor.dead_letter"]["ready"]
    # An unknown task name is rejected by the worker and dead-lettered by RabbitMQ
    producer.send_task("default.no_such_task", args=())
    wait_for(
        lambda: broker_counts(managed_rabbit)["conveyor.dead_letter"]["ready"] == before + 1,
        20,
        what="the message to be dead-lettered",
    )
    wait_for(
        lambda: sample(scrape(exporter), "conveyor_dead_letter_messages") == before + 1,
        10,
        interval=0.5,
        what="the dead-letter gauge",
    )


def test_the_exporter_serves_every_metric_the_alerts_and_dashboard_use(
    monitored_worker: WorkerProcess, exporter: str
) -> None:
    exported = families(exporter)
    used = conveyor_metric_names(alert_expressions() + dashboard_expressions())
    missing = {n.removesuffix("_total") for n in used - EXTENSION_METRICS} - exported
    assert not missing, f"used in alerts/dashboard but not exported: {sorted(missing)}"


def test_the_exporter_reports_each_broker_nodes_file_handles_and_sockets(
    monitored_worker: WorkerProcess, managed_rabbit: ManagedRabbitNode, exporter: str
) -> None:
    status = json.loads(managed_rabbit.ctl("status", "--formatter", "json"))
    truth = status["file_descriptors"]
    node = {"node": managed_rabbit.node_name}

    metrics = scrape(exporter)

    # The limits are the node's own; the figures in use include the worker's connection
    assert sample(metrics, "conveyor_broker_sockets_limit", **node) == truth["sockets_limit"]
    total = sample(metrics, "conveyor_broker_file_descriptors_limit", **node)
    assert total is not None and total >= truth["total_limit"]
    used = sample(metrics, "conveyor_broker_file_descriptors_used", **node)
    assert used is not None and 0 < used < total
    sockets = sample(metrics, "conveyor_broker_sockets_used", **node)
    assert sockets is not None and sockets >= 1


def run_celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    return subprocess.run(
        [celery, "-A", "tasks", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_overview_command_shows_workers_queues_and_dead_letters(
    monitored_worker: WorkerProcess,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    producer: Celery,
) -> None:
    producer.send_task("batch.not_served", args=())
    env = {
        "CELERY_BROKER_URL": managed_rabbit.url,
        "CELERY_RESULT_BACKEND": monitored_backend,
        "CONVEYOR_RABBITMQ_API": managed_rabbit.api_url,
    }
    try:

        def agrees() -> dict[str, Any] | None:
            done = run_celery(env, "overview", "--json")
            assert done.returncode == 0, done.stderr
            data: dict[str, Any] = json.loads(done.stdout)
            truth = broker_counts(managed_rabbit)
            queues = {q["name"]: q for q in data["queues"]}
            if not {"batch", "default"} <= queues.keys():
                return None  # the management API lists a queue after its first statistics
            same = (
                queues["batch"]["ready"] == truth["batch"]["ready"] >= 1
                and queues["default"]["consumers"] == truth["default"]["consumers"] == 1
                and data["dead_letters"]["messages"] == truth["conveyor.dead_letter"]["ready"]
            )
            return data if same else None

        # The management API's figures lag by up to a statistics interval (1 s here)
        data = wait_for(agrees, 20, interval=0.5, what="overview to agree with rabbitmqctl")
        [worker] = [w for w in data["workers"] if w["name"] == monitored_worker.node]
        assert worker["queues"] == ["default", "priority"]
        assert worker["concurrency"] == 2
        [node] = data["broker_nodes"]
        assert node["node"] == managed_rabbit.node_name
        assert 0 < node["fd_used"] < node["fd_total"]

        text = run_celery(env, "overview")
        assert text.returncode == 0, text.stderr
        assert monitored_worker.node in text.stdout
        assert "Dead letters (conveyor.dead_letter)" in text.stdout
        assert "Broker nodes (file handles and sockets)" in text.stdout
    finally:
        managed_rabbit.ctl("purge_queue", "batch")


def test_the_overview_asks_the_workers_in_one_broadcast_and_shows_what_they_run(
    monitored_worker: WorkerProcess,
    producer: Celery,
    ledger: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from monitoring import overview

    # Given a worker running one task
    sent: list[str] = []
    broadcast = producer.control.broadcast

    def counted(command: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(command)
        return broadcast(command, *args, **kwargs)

    monkeypatch.setattr(producer.control, "broadcast", counted)
    held = producer.send_task("tests.hold", args=("overview",))
    try:
        # When the overview is collected
        def running() -> dict[str, Any] | None:
            sent.clear()
            rows = overview.workers(producer, timeout=1.0)
            [row] = [row for row in rows if row["name"] == monitored_worker.node]
            return row if row["active"] == 1 else None

        row = wait_for(running, 20, interval=0.2, what="the overview to show the running task")

        # Then one broadcast told the pool size, the running task and the queues consumed
        assert sent == ["conveyor_summary"]
        assert row["concurrency"] == 2
        assert row["queues"] == ["default", "priority"]
        assert isinstance(row["processed"], int)
    finally:
        ledger.set("release:overview", 1)
    held.get(timeout=30)


def test_passive_and_management_sources_agree_on_ready_messages(
    monitored_worker: WorkerProcess, managed_rabbit: ManagedRabbitNode, producer: Celery
) -> None:
    producer.send_task("schedule.not_served", args=())
    names = queue_stats.monitored_queues(producer)

    def ready(snap: queue_stats.BrokerSnapshot) -> dict[str, int]:
        return {name: stats.ready for name, stats in snap.queues.items()}

    try:
        # The management API's figures lag by up to a statistics interval; passive declares
        # are immediate. Once the API has caught up, the two agree on every queue.
        wait_for(
            lambda: (
                ready(queue_stats.from_management_api(managed_rabbit.api_url, "/", names))
                == ready(queue_stats.from_passive_declare(producer, names))
            ),
            10,
            interval=0.5,
            what="the management API to agree with passive declares",
        )
        assert ready(queue_stats.from_passive_declare(producer, names))["scheduled"] >= 1
    finally:
        managed_rabbit.ctl("purge_queue", "scheduled")


def test_log_lines_written_inside_a_task_carry_its_id_name_queue_and_batch(
    monitored_worker: WorkerProcess, producer: Celery
) -> None:
    result = producer.send_task("tests.log_line", args=("hello-logs",), kwargs={"batch_id": "b-42"})
    task_id = result.get(timeout=30)

    def line() -> dict[str, Any] | None:
        for raw in monitored_worker.log().splitlines():
            if raw.startswith("{") and "note hello-logs" in raw:
                return dict(json.loads(raw))
        return None

    record = wait_for(line, 10, what="the task's log line")
    assert record["task_id"] == task_id == result.id
    assert record["task_name"] == "tests.log_line"
    assert record["queue"] == "default"
    assert record["retries"] == 0
    assert record["batch_id"] == "b-42"
    assert record["level"] == "INFO"


PRODUCER = """
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)

from workers.tracing import instrument
instrument()
from tests.worker_tasks import add

result = add.delay(2, 3)
assert result.get(timeout=30) == 5
spans = [
    {"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
     "span_id": format(s.context.span_id, "016x")}
    for s in memory.get_finished_spans()
]
print(json.dumps({"task_id": result.id, "spans": spans}))
"""


def test_a_trace_links_the_producer_span_to_the_worker_span(
    monitored_worker: WorkerProcess,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    otlp_collector: OtlpCollector,
) -> None:
    # Given a producer process tracing into memory, and the worker exporting over OTLP/HTTP
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CELERY_BROKER_URL": managed_rabbit.url,
            "CELERY_RESULT_BACKEND": monitored_backend,
        },
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    produced = json.loads(done.stdout.strip().splitlines()[-1])
    [publish] = [s for s in produced["spans"] if s["name"] == "apply_async/tests.add"]

    # Then the worker's run span is in the same trace, as a child of the publish span
    def run_span() -> dict[str, Any] | None:
        return next(
            (
                s
                for s in list(otlp_collector.spans)
                if s["name"] == "run/tests.add" and s["trace_id"] == publish["trace_id"]
            ),
            None,
        )

    span = wait_for(run_span, 15, what="the worker's span in the producer's trace")
    assert span["parent_span_id"] == publish["span_id"]
    assert span["service"] == "conveyor-worker"
