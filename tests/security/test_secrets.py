"""Secrets come from the environment or *_FILE paths and never show in logs or inspect output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from port_for import get_port
from pytest_redis.executor.process import RedisExecutor

from tests.infra import (
    ROOT,
    RabbitNode,
    WorkerProcess,
    compose_command,
    redis_server_available,
    require,
    wait_for,
)

BROKER_PASSWORD = "brk-Zq7-never-shown"
REDIS_PASSWORD = "rds-Xw4-never-shown"


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


@pytest.mark.integration
def test_passwords_never_appear_in_worker_logs_or_inspect_output(
    rabbit: RabbitNode, password_redis: str, tmp_path: Path
) -> None:
    # Given a broker user and a Redis that both need passwords, given as secret files
    rabbit.ctl("add_user", "secret-app", BROKER_PASSWORD)
    rabbit.ctl("set_permissions", "-p", "/", "secret-app", ".*", ".*", ".*")
    broker_url = f"amqp://secret-app:{BROKER_PASSWORD}@127.0.0.1:{rabbit.port}//"
    backend_url = f"{password_redis}/0"
    (tmp_path / "broker").write_text(broker_url)
    (tmp_path / "backend").write_text(backend_url)
    secret_env = {
        "CELERY_BROKER_URL_FILE": str(tmp_path / "broker"),
        "CELERY_RESULT_BACKEND_FILE": str(tmp_path / "backend"),
    }
    worker = WorkerProcess(
        broker_url="",
        result_backend="",
        workdir=tmp_path / "worker",
        name="secret-worker",
        env=secret_env,
    )
    env = worker.environment()
    worker.start()
    try:
        # When a task runs and an operator inspects the worker's configuration
        produce = "from tests.worker_tasks import add\nprint(add.delay(1, 1).get(timeout=20))\n"
        ran = subprocess.run(
            [sys.executable, "-c", produce], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert ran.stdout.strip() == "2", ran.stderr
        celery = str(Path(sys.executable).with_name("celery"))
        inspected = subprocess.run(
            [celery, "-A", "tasks", "inspect", "conf", "--json", "-d", worker.node],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert inspected.returncode == 0, inspected.stderr
        conf = json.loads(inspected.stdout)[worker.node]
        assert conf["broker_url"].startswith("amqp://secret-app:**")
        # And through the overview command and Flower's pages and API
        overview = subprocess.run(
            [celery, "-A", "tasks", "overview", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert overview.returncode == 0, overview.stderr
        assert worker.node in overview.stdout
        flower_pages = flower_output(env, tmp_path, worker.node)
    finally:
        worker.stop()

    # Then neither password appears anywhere an operator or a log shipper would see it
    outputs = (worker.log(), inspected.stdout, inspected.stderr, ran.stderr, overview.stdout)
    for text in (*outputs, overview.stderr, *flower_pages):
        assert BROKER_PASSWORD not in text
        assert REDIS_PASSWORD not in text


def flower_output(env: dict[str, str], tmp_path: Path, node: str) -> list[str]:
    """Flower (compose's command) on loopback: its pages and API, and its own log."""
    port = get_port(None)
    command = compose_command("flower")
    argv = [str(Path(sys.executable).with_name("celery")), *command[1:]]
    argv = [a for a in argv if not a.startswith(("--address", "--port"))]
    log = tmp_path / "flower.log"
    flower_env = {**env, "FLOWER_BASIC_AUTH": "ops:flower-pw"}
    process = subprocess.Popen(
        [*argv, "--address=127.0.0.1", f"--port={port}"],
        cwd=ROOT, env=flower_env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    auth = base64.b64encode(b"ops:flower-pw").decode()

    def get(path: str) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {auth}"}
        )
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
    finally:
        process.terminate()
        process.wait(20)
    return [*pages, log.read_text(errors="replace")]
