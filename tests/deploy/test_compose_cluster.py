"""compose.yaml's `cluster` profile: three RabbitMQ nodes and workers that fail over between them.

Validated statically like the rest of compose.yaml (no Docker engine here); the node entrypoint
script that installs the shared Erlang cookie is run for real.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kombu import Connection

from tests.infra import RABBITMQ_BIN, ROOT, ChaosRabbitNode, compose_command
from tests.unit.test_compose import REQUIRED, compose_config

NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
#: Each broker client of the cluster profile and the single-node service it mirrors.
COUNTERPARTS = {
    "worker-cluster": "worker",
    "worker_priority-cluster": "worker_priority",
    "beat-cluster": "beat",
    "flower-cluster": "flower",
    "exporter-cluster": "exporter",
    "console-cluster": "console",
}
CLUSTER_SERVICES = {*NODES, "rabbitmq-cluster-ready", *COUNTERPARTS}
BROKER = "CELERY_BROKER_URL"
API_URLS = {"FLOWER_BROKER_API", "CONVEYOR_RABBITMQ_API"}
NODE_SCRIPT = ROOT / "deploy" / "rabbitmq" / "cluster-node.sh"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    done = compose_config(REQUIRED, "--profile", "cluster")
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout)["services"])


def test_the_cluster_profile_validates_and_only_it_holds_the_cluster(
    services: dict[str, Any],
) -> None:
    assert set(services) >= CLUSTER_SERVICES
    for name, service in services.items():
        if name in CLUSTER_SERVICES:
            assert service["profiles"] == ["cluster"], name
        else:
            assert service.get("profiles", []) != ["cluster"], name


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_the_cluster_profile_refuses_to_start_without_each_password(missing: str) -> None:
    done = compose_config(
        {k: v for k, v in REQUIRED.items() if k != missing}, "--profile", "cluster"
    )
    assert done.returncode != 0
    assert missing in done.stderr


def test_the_nodes_discover_each_other_from_the_config_file(services: dict[str, Any]) -> None:
    conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text()
    settings = dict(
        line.split(" = ", 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.")}
    assert listed == {f"rabbit@{services[node]['hostname']}" for node in NODES}
    for node in NODES:
        mounts = {volume.split(":")[1] for volume in services[node]["volumes"]}
        assert "/etc/rabbitmq/conf.d/30-cluster.conf" in mounts, node
    # The others join rabbitmq-1 once it is up, instead of racing to form clusters of their own.
    for node in NODES[1:]:
        assert services[node]["depends_on"] == {"rabbitmq-1": {"condition": "service_healthy"}}


def test_the_nodes_load_the_single_nodes_definitions_and_config(services: dict[str, Any]) -> None:
    single = {volume.split(":", 1)[1] for volume in services["rabbitmq"]["volumes"]}
    data = {volume for volume in single if volume.startswith("/var/lib/rabbitmq")}
    data_volumes = set()
    for node in NODES:
        mounts = {volume.split(":", 1)[1] for volume in services[node]["volumes"]}
        assert single - data <= mounts, node
        assert services[node]["image"] == services["rabbitmq"]["image"]
        assert services[node]["healthcheck"] == services["rabbitmq"]["healthcheck"]
        assert [s["source"] for s in services[node]["secrets"]] == ["rabbitmq_erlang_cookie"]
        data_volumes |= {v.split(":")[0] for v in services[node]["volumes"] if ":/var/lib/" in v}
    assert len(data_volumes) == len(NODES), "each node keeps its own data directory"
    assert services["rabbitmq-1"]["depends_on"] == services["rabbitmq"]["depends_on"]


def test_the_cluster_worker_runs_the_tested_command(services: dict[str, Any]) -> None:
    assert services["worker-cluster"]["command"].split() == compose_command("worker")


def test_every_broker_client_in_the_cluster_profile_lists_all_three_nodes(
    services: dict[str, Any],
) -> None:
    in_profile = {name for name, s in services.items() if s.get("profiles") == ["cluster"]}
    clients = {name for name in in_profile if "CELERY_BROKER_URL" in environment(services, name)}
    # Every service of the single-node stack that talks to the broker has its counterpart.
    single_clients = {
        name
        for name in set(services) - in_profile
        # Services of other optional profiles (the outbox's relay) are not the single-node stack.
        if not services[name].get("profiles") and "CELERY_BROKER_URL" in environment(services, name)
    }
    assert clients == set(COUNTERPARTS)
    assert single_clients == set(COUNTERPARTS.values())
    for name in in_profile:
        service = services[name]
        assert "rabbitmq" not in service.get("depends_on", {}), name
        for key, value in environment(services, name).items():
            assert "@rabbitmq:" not in str(value), f"{name} {key} names the single node"
        if name in clients:
            urls = environment(services, name)["CELERY_BROKER_URL"].split(";")
            hosts = [Connection(url).hostname for url in urls]
            assert hosts == [services[node]["hostname"] for node in NODES], name


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
def test_each_cluster_service_is_its_single_node_counterpart_on_every_node(
    services: dict[str, Any], name: str
) -> None:
    cluster, single = services[name], services[COUNTERPARTS[name]]
    for key in ("command", "healthcheck", "stop_grace_period"):
        assert cluster.get(key) == single.get(key), key
    # The same account and vhost on each node, and kombu reads the `;`-separated list as one
    # connection with failover alternates.
    url = environment(services, name)["CELERY_BROKER_URL"]
    urls = url.split(";")
    one = Connection(environment(services, COUNTERPARTS[name])["CELERY_BROKER_URL"])
    for each in map(Connection, urls):
        assert (each.userid, each.password, each.virtual_host, each.port) == (
            one.userid,
            one.password,
            one.virtual_host,
            one.port,
        )
    assert Connection(url).alt == urls
    # A management API URL, where the service has one, is the same on the first node.
    for key in API_URLS & set(environment(services, name)):
        api = urlsplit(environment(services, name)[key])
        assert api.hostname == services[NODES[0]]["hostname"], key
        assert api._replace(netloc="") == urlsplit(
            environment(services, COUNTERPARTS[name])[key]
        )._replace(netloc=""), key
    # Everything else is the single-node service's environment.
    others = {k: v for k, v in environment(services, name).items() if k not in {*API_URLS, BROKER}}
    same = {
        k: v
        for k, v in environment(services, COUNTERPARTS[name]).items()
        if k not in {*API_URLS, BROKER}
    }
    assert others == same
    assert cluster["depends_on"] == {
        "rabbitmq-cluster-ready": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }

    # Both can run side by side: no shared published port or data volume.
    def published(service: dict[str, Any]) -> set[str]:  # "127.0.0.1:5555:5555/tcp"
        return {port.rsplit(":", 1)[0] for port in service.get("ports", [])}

    def volumes(service: dict[str, Any]) -> set[str]:  # "flower-data:/var/lib/conveyor:rw"
        return {volume.split(":", 1)[0] for volume in service.get("volumes", [])}

    assert not published(cluster) & published(single)
    assert not volumes(cluster) & volumes(single)


def environment(services: dict[str, Any], name: str) -> dict[str, str]:
    return dict(services[name].get("environment", {}))


def test_the_queues_get_a_replica_on_every_node_once_the_cluster_is_up(
    services: dict[str, Any],
) -> None:
    ready = services["rabbitmq-cluster-ready"]
    assert set(ready["depends_on"]) == set(NODES)
    script = ready["command"][-1]
    for node in NODES[1:]:
        assert f"rabbit@{node}" in script
    assert "rabbitmq-queues -n rabbit@rabbitmq-1 grow" in script


def run_node_script(tmp_path: Path, cookie: str | None) -> subprocess.CompletedProcess[str]:
    """cluster-node.sh with the image's entrypoint replaced by one that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entrypoint = bin_dir / "docker-entrypoint.sh"
    entrypoint.write_text('#!/bin/sh\necho "entrypoint: $*"\n')
    entrypoint.chmod(0o755)
    secret = tmp_path / "cookie-secret"
    secret.write_text(cookie or "")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "CONVEYOR_COOKIE_SECRET": str(secret),
        "CONVEYOR_RABBITMQ_HOME": str(tmp_path / "data"),
    }
    return subprocess.run(
        ["sh", str(NODE_SCRIPT), "rabbitmq-server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_node_refuses_to_start_without_the_cookie(tmp_path: Path) -> None:
    done = run_node_script(tmp_path, cookie=None)
    assert done.returncode == 1
    assert "RABBITMQ_ERLANG_COOKIE_FILE" in done.stderr
    assert "entrypoint" not in done.stdout
    assert not (tmp_path / "data" / ".erlang.cookie").exists()


def test_a_node_installs_the_shared_cookie_readable_by_its_owner_only(tmp_path: Path) -> None:
    done = run_node_script(tmp_path, cookie="s3cr3t-cookie\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "entrypoint: rabbitmq-server"
    for path in (tmp_path / "data" / ".erlang.cookie", tmp_path / "home" / ".erlang.cookie"):
        assert path.read_text() == "s3cr3t-cookie"
        assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert os.access(NODE_SCRIPT, os.X_OK)


@pytest.mark.integration
def test_rabbitmq_boots_with_the_cluster_nodes_config_and_definitions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the files a cluster node mounts (conveyor.conf, cluster.conf) and the definitions
    # the one-shot writes, with the definitions path pointed at a private file
    for role in ("ADMIN", "PRODUCER", "WORKER", "MONITOR", "EXPORTER"):
        monkeypatch.setenv(f"CONVEYOR_{role}_PASSWORD", f"pw-{role.lower()}")
    definitions = tmp_path / "definitions.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "rabbitmq" / "definitions.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    definitions.write_text(done.stdout)
    rabbitmq = ROOT / "deploy" / "rabbitmq"
    conveyor_conf = (
        (rabbitmq / "conveyor.conf")
        .read_text()
        .replace("/etc/rabbitmq/definitions/definitions.json", str(definitions))
    )
    assert str(definitions) in conveyor_conf
    config = conveyor_conf + (rabbitmq / "cluster.conf").read_text()
    # The guest account the test node adds is not used; the node's own settings come first.
    node = ChaosRabbitNode(tmp_path / "node", extra_config=config)

    # When a RabbitMQ 3.10 node starts with them, none of its listed peers reachable
    node.start()
    try:
        # Then it accepts every setting (an unknown key stops the boot), forms a cluster of
        # its own and has loaded the Conveyor topology
        status = node.ctl("cluster_status", "--formatter", "json")
        assert node.node_name in status
        queues = json.loads(
            node.ctl("list_queues", "-p", "conveyor", "name", "type", "--formatter", "json")
        )
        types = {row["name"]: row["type"] for row in queues}
        assert {types[name] for name in ("default", "batch", "scheduled", "priority")} == {"quorum"}
        users = node.ctl("list_users", "--formatter", "json")
        assert "conveyor-worker" in users and "conveyor-monitor" in users

        # And the cluster-ready step's command runs on RabbitMQ 3.10 and is a no-op where every
        # queue already has its replica (as on a second `up`): here "the other nodes" is the
        # node itself, which holds all of them.
        compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
        script = compose["services"]["rabbitmq-cluster-ready"]["command"][-1].replace("$$", "$")
        script = (
            script.replace("rabbit@rabbitmq-2 rabbit@rabbitmq-3", node.node_name)
            .replace("rabbit@rabbitmq-1", node.node_name)
            .replace("rabbitmq-queues", str(RABBITMQ_BIN / "rabbitmq-queues"))
        )
        grown = subprocess.run(
            ["sh", "-c", script],
            env=node.executor._popen_kwargs["env"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert grown.returncode == 0, grown.stdout + grown.stderr
        assert "Growing all quorum queues" in grown.stdout
    finally:
        node.stop()
