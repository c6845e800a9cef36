"""Secrets come from the environment or *_FILE paths and never show in logs or inspect output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from port_for import get_port
from pytest_redis.executor.process import RedisExecutor

from core.config import ConfigurationError
from tests.infra import (
    ROOT,
    ManagedRabbitNode,
    WorkerProcess,
    compose_command,
    redis_server_available,
    require,
    wait_for,
)
from tests.monitoring.conftest import ServiceProcess, project_command

BROKER_PASSWORD = "brk-Zq7-never-shown"
REDIS_PASSWORD = "rds-Xw4-never-shown"
MONITOR_PASSWORD = "mon-Kp2-never-shown"
WEBHOOK_SECRET = "whk-Jd9-never-shown"
FLOWER_LOGIN = "ops:flw-Hb5-never-shown"
SECRETS = (BROKER_PASSWORD, REDIS_PASSWORD, MONITOR_PASSWORD, WEBHOOK_SECRET, FLOWER_LOGIN)


def import_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import celeryconfig as c; print(c.broker_url); print(c.result_backend)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True
    )


def test_urls_can_come_from_secret_files(tmp_path: Path) -> None:
    (tmp_path / "broker").write_text("amqp://app:pw@rabbit:5672/conveyor\n")
    (tmp_path / "backend").write_text("redis://:pw@redis:6379/0")
    done = import_config(
        {
            "CELERY_BROKER_URL_FILE": str(tmp_path / "broker"),
            "CELERY_RESULT_BACKEND_FILE": str(tmp_path / "backend"),
        }
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["amqp://app:pw@rabbit:5672/conveyor", "redis://:pw@redis:6379/0"]


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    done = import_config({"CELERY_BROKER_URL_FILE": str(tmp_path / "absent")})
    assert done.returncode != 0
    assert "CELERY_BROKER_URL_FILE" in done.stderr and "cannot be read" in done.stderr


def test_a_value_and_its_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "broker").write_text("amqp://a:b@h//")
    done = import_config(
        {"CELERY_BROKER_URL": "amqp://a:b@h//", "CELERY_BROKER_URL_FILE": str(tmp_path / "broker")}
    )
    assert done.returncode != 0
    assert "not both" in done.stderr


#: Secret-bearing settings that are optional, by the variable (and NAME_FILE) that sets them.
OPTIONAL_SECRETS = {
    "CONVEYOR_RABBITMQ_API": "conveyor_rabbitmq_api",
    "CONVEYOR_SCHEDULE_REDIS_URL": "redbeat_redis_url",
    "CONVEYOR_IDEMPOTENCY_URL": "conveyor_idempotency_url",
    "CONVEYOR_WEBHOOK_SECRET": "conveyor_webhook_secret",
}


def config_value(setting: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = f"import celeryconfig as c; print(c.{setting})"
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CELERY_") and not k.startswith(tuple(OPTIONAL_SECRETS))
    }
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True
    )


@pytest.mark.parametrize(("variable", "setting"), OPTIONAL_SECRETS.items())
def test_secret_settings_can_come_from_files_with_the_same_checks(
    variable: str, setting: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("redis://:s3cr3t@redis:6379/3\n")
    done = config_value(setting, {f"{variable}_FILE": str(secret)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "redis://:s3cr3t@redis:6379/3"
    both = config_value(setting, {variable: "x", f"{variable}_FILE": str(secret)})
    assert both.returncode != 0 and "not both" in both.stderr
    absent = config_value(setting, {f"{variable}_FILE": str(tmp_path / "absent")})
    assert absent.returncode != 0
    assert f"{variable}_FILE" in absent.stderr and "cannot be read" in absent.stderr


def test_flower_secrets_can_come_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitoring.flower import apply_secret_files

    (tmp_path / "api").write_text("http://mon:pw@rabbitmq:15672/api/\n")
    (tmp_path / "auth").write_text("ops:pw1,dev:pw2")
    monkeypatch.delenv("FLOWER_BROKER_API", raising=False)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.setenv("FLOWER_BROKER_API_FILE", str(tmp_path / "api"))
    monkeypatch.setenv("FLOWER_BASIC_AUTH_FILE", str(tmp_path / "auth"))
    options = SimpleNamespace(broker_api=None, basic_auth=[])
    apply_secret_files(options)
    assert options.broker_api == "http://mon:pw@rabbitmq:15672/api/"
    assert options.basic_auth == ["ops:pw1", "dev:pw2"]
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:pw1")
    with pytest.raises(ConfigurationError, match="not both"):
        apply_secret_files(options)


@pytest.fixture(scope="module")
def password_redis() -> Iterator[str]:
    require(redis_server_available(), "redis-server not found")
    port = get_port(None)
    executor = RedisExecutor(
        "redis-server",
        databases=16,
        redis_timeout=30,
        loglevel="warning",
        host="127.0.0.1",
        port=port,
        password=REDIS_PASSWORD,
        datadir=Path(tempfile.mkdtemp(prefix="secret-redis-")),
    )
    executor.start()
    yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}"
    executor.stop()


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedRabbitNode]:
    node = ManagedRabbitNode(tmp_path_factory.mktemp("secrets-rabbit")).start()
    yield node
    node.stop()


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_passwords_never_appear_in_logs_inspect_report_metrics_or_flower(
    managed: ManagedRabbitNode, password_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker user, a monitoring user and a Redis that all need passwords, a webhook
    # secret and Flower's login, every one of them given as a secret file
    managed.ctl("add_user", "secret-app", BROKER_PASSWORD)
    managed.ctl("set_permissions", "-p", "/", "secret-app", ".*", ".*", ".*")
    managed.ctl("add_user", "secret-monitor", MONITOR_PASSWORD)
    managed.ctl("set_user_tags", "secret-monitor", "monitoring")
    managed.ctl("set_permissions", "-p", "/", "secret-monitor", ".*", ".*", ".*")
    api = f"http://secret-monitor:{MONITOR_PASSWORD}@127.0.0.1:{managed.management_port}/api/"
    files = {
        "CELERY_BROKER_URL": f"amqp://secret-app:{BROKER_PASSWORD}@127.0.0.1:{managed.port}//",
        "CELERY_RESULT_BACKEND": f"{password_redis}/0",
        "CONVEYOR_SCHEDULE_REDIS_URL": f"{password_redis}/0",
        "CONVEYOR_RABBITMQ_API": api,
        "CONVEYOR_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "FLOWER_BROKER_API": api,
        "FLOWER_BASIC_AUTH": FLOWER_LOGIN,
    }
    secret_env = {}
    for name, value in files.items():
        (tmp_path / name).write_text(value)
        secret_env[f"{name}_FILE"] = str(tmp_path / name)
    worker = WorkerProcess(
        broker_url="",
        result_backend="",
        workdir=tmp_path / "worker",
        name="secret-worker",
        env=secret_env,
    )
    # Only the files: other tests may have set these in this process's environment, which
    # the processes started here inherit
    for name in files:
        monkeypatch.delenv(name, raising=False)
    env = worker.environment()
    worker.start()
    celery = str(Path(sys.executable).with_name("celery"))
    try:
        # When a task runs and an operator inspects the worker's configuration
        produce = "from tests.worker_tasks import add\nprint(add.delay(1, 1).get(timeout=20))\n"
        ran = run([sys.executable, "-c", produce], env)
        assert ran.stdout.strip() == "2", ran.stderr
        inspected = run(
            [celery, "-A", "tasks", "inspect", "conf", "--json", "-d", worker.node], env
        )
        assert inspected.returncode == 0, inspected.stderr
        conf = json.loads(inspected.stdout)[worker.node]
        assert conf["broker_url"].startswith("amqp://secret-app:**")
        # And through Celery's report command, the overview command, beat, the exporter and
        # Flower's pages and API
        report = run([celery, "-A", "tasks", "report"], env)
        assert report.returncode == 0, report.stderr
        assert "conveyor_rabbitmq_api" in report.stdout
        overview = run([celery, "-A", "tasks", "overview", "--json"], env)
        assert overview.returncode == 0, overview.stderr
        assert worker.node in overview.stdout
        beat_log = beat_output(env, tmp_path)
        metrics = exporter_output(env, tmp_path)
        flower_pages = flower_output(env, tmp_path, worker.node)
    finally:
        worker.stop()

    # Then no secret appears anywhere an operator or a log shipper would see it
    outputs = (worker.log(), inspected.stdout, inspected.stderr, ran.stderr, overview.stdout)
    outputs += (overview.stderr, report.stdout, report.stderr, beat_log, *metrics, *flower_pages)
    for text in outputs:
        for secret in SECRETS:
            assert secret not in text


def beat_output(env: dict[str, str], tmp_path: Path) -> str:
    """Beat (compose's command) until it answers ping; its log."""
    node = f"celerybeat-secrets-{os.getpid()}@localhost"
    beat_env = {
        **env,
        "CELERY_REDBEAT_KEY_PREFIX": f"secrets-{os.getpid()}:",
        "CELERY_CONVEYOR_BEAT_BUILTIN_ENTRIES": "false",
    }
    beat = ServiceProcess(
        [*project_command("beat"), f"--hostname={node}"], beat_env, tmp_path / "beat.log"
    ).start()
    celery = str(Path(sys.executable).with_name("celery"))
    ping = [celery, "-A", "tasks", "inspect", "ping", "--destination", node, "--timeout", "5"]
    try:
        wait_for(lambda: run(ping, env).returncode == 0, 60, interval=1, what="beat to answer")
    finally:
        beat.stop()
    return beat.log()


def exporter_output(env: dict[str, str], tmp_path: Path) -> list[str]:
    """The exporter's /metrics once it has read the management API, and its log."""
    port = get_port(None)
    exporter = ServiceProcess(
        project_command("exporter", "--address=127.0.0.1", f"--port={port}"),
        env,
        tmp_path / "exporter.log",
    ).start()
    url = f"http://127.0.0.1:{port}/metrics"

    def from_the_api() -> str | None:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return text if "conveyor_queue_messages_unacked{" in text else None

    try:
        exporter.wait_for_http(url)
        text = wait_for(from_the_api, 30, interval=1, what="the exporter to read the API")
    finally:
        exporter.stop()
    return [text, exporter.log()]


def flower_output(env: dict[str, str], tmp_path: Path, node: str) -> list[str]:
    """Flower (compose's command) on loopback: its pages and API, and its own log."""
    port = get_port(None)
    command = compose_command("flower")
    argv = [str(Path(sys.executable).with_name("celery")), *command[1:]]
    argv = [a for a in argv if not a.startswith(("--address", "--port"))]
    log = tmp_path / "flower.log"
    process = subprocess.Popen(
        [*argv, "--address=127.0.0.1", f"--port={port}"],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    auth = base64.b64encode(FLOWER_LOGIN.encode()).decode()

    def get(path: str, authorization: str | None = f"Basic {auth}") -> str:
        headers = {"Authorization": authorization} if authorization else {}
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())

    def answers() -> bool:
        try:
            return node in get("/api/workers?refresh=1")
        except OSError:
            return False

    try:
        wait_for(answers, 60, interval=0.5, what="Flower to list the worker")
        pages = [get(path) for path in ("/api/workers?refresh=1", f"/worker/{node}", "/broker")]
        # Its login came from FLOWER_BASIC_AUTH_FILE: without it, Flower answers 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            get("/api/workers", authorization=None)
        assert refused.value.code == 401
    finally:
        process.terminate()
        process.wait(20)
    # Its management-API URL came from FLOWER_BROKER_API_FILE: the broker page has the queues
    assert "<td>default</td>" in pages[2], pages[2][-2000:]
    return [*pages, log.read_text(errors="replace")]
