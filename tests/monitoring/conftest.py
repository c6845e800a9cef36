"""The monitored stack: a private RabbitMQ with its management API, a real worker, the
exporter and Flower, each started with compose.yaml's command plus test-only flags."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from port_for import get_port
from prometheus_client.parser import text_string_to_metric_families

from tests.infra import (
    ROOT,
    ManagedRabbitNode,
    WorkerProcess,
    compose_command,
    stop_process,
    wait_for,
)

FLOWER_USER, FLOWER_PASSWORD = "operator", "s3cret-pass"
#: Where screenshots and other evidence go (kept by CI as artifacts).
ARTIFACTS = Path(os.environ.get("CONVEYOR_TEST_ARTIFACTS", ROOT / "test-artifacts"))
MONITORING_TASKS = "--include=tests.worker_tasks,tests.monitoring.monitoring_tasks"


@dataclass
class ServiceProcess:
    """A long-running command of the project (exporter, Flower), logged to a file."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_http(self, url: str, timeout: float = 60) -> None:
        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"{self.argv[3]} exited {self.process.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
            except urllib.error.HTTPError:
                return True  # it answers, if only to say 401
            except OSError:
                return False
            return True

        wait_for(answers, timeout, interval=0.3, what=f"{url} to answer")

    def stop(self) -> None:
        stop_process(self.process, 20)


def project_command(service: str, *test_flags: str) -> list[str]:
    """compose.yaml's command for `service` with this virtualenv's celery, plus test flags."""
    command = compose_command(service)
    assert command[0] == "celery"
    return [str(Path(sys.executable).with_name("celery")), *command[1:], *test_flags]


@dataclass
class OtlpCollector:
    """An OTLP/HTTP trace receiver on loopback that keeps every span it is sent."""

    url: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="session")
def managed_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedRabbitNode]:
    node = ManagedRabbitNode(tmp_path_factory.mktemp("managed-rabbit")).start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def monitored_backend(result_backend: str) -> str:
    # The suite's own backend: Celery reads CELERY_RESULT_BACKEND from the environment before
    # its configuration, and the session's conveyor_app fixture sets that variable.
    return result_backend


@pytest.fixture(scope="session")
def producer(managed_rabbit: ManagedRabbitNode, monitored_backend: str) -> Iterator[Celery]:
    """A client app with the project's configuration, publishing to the managed node."""
    app = Celery("producer", set_as_current=False)
    app.config_from_object("celeryconfig")
    # Read/write URLs, because Celery prefers CELERY_BROKER_URL from the environment (set by
    # the session's conveyor_app fixture) over broker_url.
    app.conf.update(
        broker_url=managed_rabbit.url,
        broker_read_url=managed_rabbit.url,
        broker_write_url=managed_rabbit.url,
        result_backend=monitored_backend,
    )
    # Declare every task queue here: the monitored worker consumes only some of them, and the
    # Queue objects of celeryconfig are shared with tasks.app, which may have bound them to
    # another broker's channel (kombu then declares on that one at publish time).
    with app.connection_for_write() as connection:
        channel = connection.channel()
        for queue in app.conf.task_queues:
            queue(channel).declare()
        channel.close()
    yield app
    app.close()


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    state = OtlpCollector()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        with lock:
                            state.spans.append(
                                {
                                    "service": service,
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent_span_id": span.parent_span_id.hex(),
                                }
                            )
            body = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


@pytest.fixture(scope="session")
def monitored_worker(
    tmp_path_factory: pytest.TempPathFactory,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    ledger_url: str,
    otlp_collector: OtlpCollector,
) -> Iterator[WorkerProcess]:
    """A real worker on `default` and `priority` only (so `batch` and `scheduled` fill up),
    logging JSON and tracing to the loopback collector."""
    process = WorkerProcess(
        broker_url=managed_rabbit.url,
        result_backend=monitored_backend,
        workdir=tmp_path_factory.mktemp("monitored-worker"),
        name="monitored",
        extra_args=[MONITORING_TASKS, "--queues=default,priority"],
        env={
            "CONVEYOR_TEST_LEDGER_URL": ledger_url,
            "CONVEYOR_LOG_FORMAT": "json",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.url,
            # Export within a fraction of a second instead of the default 5 s.
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def exporter(
    tmp_path_factory: pytest.TempPathFactory,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
) -> Iterator[str]:
    """The exporter process, reading the management API; yields its /metrics URL."""
    port = get_port(None)
    service = ServiceProcess(
        project_command("exporter", "--address=127.0.0.1", f"--port={port}"),
        {
            "CELERY_BROKER_URL": managed_rabbit.url,
            "CELERY_RESULT_BACKEND": monitored_backend,
            "CONVEYOR_RABBITMQ_API": managed_rabbit.api_url,
        },
        tmp_path_factory.mktemp("exporter") / "exporter.log",
    ).start()
    url = f"http://127.0.0.1:{port}/metrics"
    service.wait_for_http(url)
    yield url
    service.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def families(url: str) -> set[str]:
    """Names of the metric families an endpoint declares, with or without samples yet."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name for family in text_string_to_metric_families(text)}


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


@dataclass
class FlowerInstance:
    url: str
    service: ServiceProcess
    db: Path


def start_flower(
    workdir: Path, rabbit: ManagedRabbitNode, backend: str, port: int, **env: str
) -> ServiceProcess:
    """Flower with compose's command, on loopback, with basic auth and the broker API."""
    service = ServiceProcess(
        project_command("flower", "--address=127.0.0.1", f"--port={port}"),
        {
            "CELERY_BROKER_URL": rabbit.url,
            "CELERY_RESULT_BACKEND": backend,
            "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}",
            "FLOWER_BROKER_API": rabbit.api_url,
            "FLOWER_PERSISTENT": "true",
            "FLOWER_DB": str(workdir / "flower"),
            **env,
        },
        workdir / "flower.log",
    ).start()
    service.wait_for_http(f"http://127.0.0.1:{port}/healthcheck")
    return service


@pytest.fixture(scope="session")
def flower(
    tmp_path_factory: pytest.TempPathFactory,
    managed_rabbit: ManagedRabbitNode,
    monitored_backend: str,
    monitored_worker: WorkerProcess,
) -> Iterator[FlowerInstance]:
    workdir = tmp_path_factory.mktemp("flower")
    port = get_port(None)
    service = start_flower(workdir, managed_rabbit, monitored_backend, port)
    instance = FlowerInstance(f"http://127.0.0.1:{port}", service, workdir / "flower")
    yield instance
    instance.service.stop()
