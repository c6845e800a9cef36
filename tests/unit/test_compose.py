"""compose.yaml is validated statically (no Docker engine here) and agrees with the Procfile."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.infra import ROOT, compose_command, require

REQUIRED = {
    "CONVEYOR_ADMIN_PASSWORD": "pw-admin",
    "CONVEYOR_PRODUCER_PASSWORD": "pw-producer",
    "CONVEYOR_WORKER_PASSWORD": "pw-worker",
    "CONVEYOR_MONITOR_PASSWORD": "pw-monitor",
    "CONVEYOR_EXPORTER_PASSWORD": "pw-exporter",
    "REDIS_PASSWORD": "pw-redis",
    "FLOWER_BASIC_AUTH": "a:b",
    "CONVEYOR_CONSOLE_AUTH": "c:d",
}


#: Services that run once and exit; the others must stay up and healthy.
ONE_SHOTS = {"rabbitmq-definitions", "rabbitmq-cluster-ready"}


def compose_config(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with exactly these variables (and options such as --profile)."""
    require(shutil.which("docker-compose") is not None, "docker-compose not installed")
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run(
        [
            "docker-compose",
            "--project-directory",
            str(ROOT),
            "-f",
            "compose.yaml",
            *options,
            "config",
        ],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compose_file_validates() -> None:
    done = compose_config(REQUIRED)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"rabbitmq", "redis", "worker", "worker_priority", "beat", "flower"} <= set(services)
    for name, service in services.items():
        if name in ONE_SHOTS:
            continue  # one-shot steps: what needs them waits for them to complete
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert services["rabbitmq"]["depends_on"] == {
        "rabbitmq-definitions": {"condition": "service_completed_successfully"}
    }
    for name in ("worker", "worker_priority", "beat", "flower"):
        conditions = {dep["condition"] for dep in services[name]["depends_on"].values()}
        assert conditions == {"service_healthy"}, name


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_each_of_its_secrets(missing: str) -> None:
    done = compose_config({k: v for k, v in REQUIRED.items() if k != missing})
    assert done.returncode != 0
    assert missing in done.stderr


def test_redis_has_a_password_and_no_published_port() -> None:
    services = yaml.safe_load(compose_config(REQUIRED).stdout)["services"]
    assert "ports" not in services["redis"]
    assert "--requirepass" in " ".join(services["redis"]["command"])
    for name in ("worker", "beat", "flower", "exporter"):
        backend = services[name]["environment"]["CELERY_RESULT_BACKEND"]
        assert backend.startswith("redis://:pw-redis@"), name


def test_each_service_uses_its_broker_role() -> None:
    services = yaml.safe_load(compose_config(REQUIRED).stdout)["services"]
    roles = {
        name: services[name]["environment"]["CELERY_BROKER_URL"].split("//")[1].split(":")[0]
        for name in ("worker", "worker_priority", "beat", "flower", "exporter")
    }
    assert roles == {
        "worker": "conveyor-worker",
        "worker_priority": "conveyor-worker",
        "beat": "conveyor-worker",
        "flower": "conveyor-monitor",
        "exporter": "conveyor-exporter",
    }


def test_compose_never_uses_the_guest_account() -> None:
    resolved = compose_config(REQUIRED).stdout  # comments dropped, variables filled in
    assert "guest" not in resolved


def test_every_variable_compose_reads_is_listed_in_env_example() -> None:
    import re

    used = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "compose.yaml").read_text()))
    listed = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used <= listed, f"missing from .env.example: {sorted(used - listed)}"


def test_the_procfile_runs_the_same_commands_as_compose() -> None:
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    for service in ("worker", "worker_priority", "beat"):
        assert procfile[service].split() == compose_command(service), service


def test_the_worker_serves_every_task_queue() -> None:
    from tasks import app

    command = compose_command("worker")
    queues = next(arg for arg in command if arg.startswith("--queues=")).split("=", 1)[1]
    assert set(queues.split(",")) == {queue.name for queue in app.conf.task_queues}
    assert yaml.safe_load((ROOT / "compose.yaml").read_text())["x-app"]["image"]


def test_flower_and_the_exporter_run_the_same_commands_in_compose_and_the_procfile() -> None:
    # Only the address differs: loopback on a developer's machine, every interface inside the
    # container (where the published port is bound to the host's loopback).
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )

    def without_address(command: list[str]) -> list[str]:
        return [arg for arg in command if not arg.startswith("--address=")]

    for service in ("flower", "exporter"):
        assert without_address(procfile[service].split()) == without_address(
            compose_command(service)
        ), service
        assert "--address=127.0.0.1" in procfile[service].split(), service
    assert "--conf=flowerconfig.py" in compose_command("flower")


def test_the_monitoring_profile_adds_prometheus_and_grafana() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["exporter"], "the exporter runs in the default stack"
    # Flower's /metrics is not behind its auth: its port is published to loopback only, and
    # the exporter's port is not published at all.
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "ports" not in services["exporter"]


def test_the_readme_says_which_workers_serve_the_priority_queue() -> None:
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    serving = [
        name
        for name, command in procfile.items()
        for arg in command.split()
        if arg.startswith("--queues=") and "priority" in arg.split("=", 1)[1].split(",")
    ]
    readme = (ROOT / "README.md").read_text()
    urgent = next(part for part in readme.split("\n\n") if part.startswith("Urgent work"))
    if len(serving) > 1:
        assert "Both workers serve the `priority` queue" in urgent, serving
    else:
        assert serving == ["worker_priority"] and "only the priority worker" in urgent


def test_env_example_sets_the_management_api_urls_the_code_reads() -> None:
    import re

    listed = dict(re.findall(r"^([A-Z_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    local_api = "http://guest:guest@127.0.0.1:15672/api/"
    assert listed["FLOWER_BROKER_API"] == local_api
    assert listed["CONVEYOR_RABBITMQ_API"] == local_api
    # Flower reads FLOWER_BROKER_API itself; the exporter and overview read this one.
    assert 'optional_secret("CONVEYOR_RABBITMQ_API")' in (ROOT / "celeryconfig.py").read_text()
    assert 'envvar="CONVEYOR_RABBITMQ_API"' in (ROOT / "monitoring/overview.py").read_text()


def test_the_outbox_profile_adds_postgres_and_the_relay_that_the_procfile_runs() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["postgres"]["profiles"] == ["outbox"]
    assert services["outbox-relay"]["profiles"] == ["outbox"]
    assert services["outbox-relay"]["command"][-1].endswith("exec celery -A tasks outbox relay")
    procfile = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert procfile["outbox_relay"].split()[:5] == ["celery", "-A", "tasks", "outbox", "relay"]
