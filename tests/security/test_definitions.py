"""deploy/rabbitmq/definitions.py: the generated topology and the role passwords (no broker)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

import celeryconfig
from tests.infra import ROOT

ROLES = ("ADMIN", "PRODUCER", "WORKER", "MONITOR", "EXPORTER")


@pytest.fixture
def definitions(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    for role in ROLES:
        monkeypatch.setenv(f"CONVEYOR_{role}_PASSWORD", f"pw-{role.lower()}")
        monkeypatch.delenv(f"CONVEYOR_{role}_PASSWORD_FILE", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "deploy" / "rabbitmq"))
    import definitions as module

    yield module
    sys.modules.pop("definitions", None)


class Recorder:
    """Stands in for a channel and records what kombu declares on it, in definitions' terms."""

    def __init__(self) -> None:
        self.exchanges: dict[str, tuple[str, dict[str, Any]]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: set[tuple[str, str, str, str]] = set()

    def channel(self) -> Recorder:
        return self

    def prepare_queue_arguments(self, arguments: dict[str, Any], **_: Any) -> dict[str, Any]:
        return arguments

    def exchange_declare(self, exchange: str, type: str, arguments: Any = None, **_: Any) -> None:
        self.exchanges[exchange] = (type, dict(arguments or {}))

    def queue_declare(self, queue: str, arguments: Any = None, **_: Any) -> None:
        self.queues[queue] = dict(arguments or {})

    def queue_bind(self, queue: str, exchange: str, routing_key: str, **_: Any) -> None:
        self.bindings.add((exchange, queue, routing_key, "queue"))

    def exchange_bind(self, destination: str, source: str, routing_key: str, **_: Any) -> None:
        self.bindings.add((source, destination, routing_key, "exchange"))


def test_the_delayed_delivery_topology_is_the_one_a_worker_declares(
    definitions: ModuleType,
) -> None:
    # Given what kombu declares for native delayed delivery when a worker starts
    kombu = Recorder()
    declare_native_delayed_delivery_exchanges_and_queues(kombu, "quorum")  # type: ignore[arg-type]
    for queue in celeryconfig.task_queues:
        bind_queue_to_native_delayed_delivery_exchange(kombu, queue)  # type: ignore[arg-type]
    # When the definitions are generated
    exchanges, queues, bindings = definitions.delayed_delivery()
    # Then they hold the same exchanges, queues (with the same arguments) and bindings
    assert {e["name"]: (e["type"], e["arguments"]) for e in exchanges} == {
        name: spec for name, spec in kombu.exchanges.items() if name.startswith("celery_")
    }
    assert {q["name"]: q["arguments"] for q in queues} == kombu.queues
    assert {
        (b["source"], b["destination"], b["routing_key"], b["destination_type"]) for b in bindings
    } == kombu.bindings
    assert len(queues) == 28


def test_the_full_definitions_include_the_delayed_delivery_topology(
    definitions: ModuleType,
) -> None:
    full = definitions.definitions()
    names = {q["name"] for q in full["queues"]}
    assert {f"celery_delayed_{level}" for level in range(28)} <= names
    assert "celery_delayed_delivery" in {e["name"] for e in full["exchanges"]}


def generate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    base = {f"CONVEYOR_{role}_PASSWORD": f"pw-{role.lower()}" for role in ROLES}
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "rabbitmq" / "definitions.py")],
        env={**clean, **base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_role_password_can_come_from_a_file(tmp_path: Path, definitions: ModuleType) -> None:
    (tmp_path / "worker").write_text("from-a-file\n")
    done = generate(
        {"CONVEYOR_WORKER_PASSWORD": "", "CONVEYOR_WORKER_PASSWORD_FILE": str(tmp_path / "worker")}
    )
    assert done.returncode == 0, done.stderr
    (user,) = [u for u in json.loads(done.stdout)["users"] if u["name"] == "conveyor-worker"]
    salt = base64.b64decode(user["password_hash"])[:4]
    assert user["password_hash"] == definitions.password_hash("from-a-file", salt)


def test_role_password_files_get_the_same_checks_as_every_secret(tmp_path: Path) -> None:
    (tmp_path / "worker").write_text("from-a-file")
    both = generate({"CONVEYOR_WORKER_PASSWORD_FILE": str(tmp_path / "worker")})
    assert both.returncode != 0
    assert "set CONVEYOR_WORKER_PASSWORD or CONVEYOR_WORKER_PASSWORD_FILE, not both" in both.stderr
    absent = generate(
        {"CONVEYOR_WORKER_PASSWORD": "", "CONVEYOR_WORKER_PASSWORD_FILE": str(tmp_path / "no")}
    )
    assert absent.returncode != 0
    assert "CONVEYOR_WORKER_PASSWORD_FILE=" in absent.stderr and "cannot be read" in absent.stderr
    missing = generate({"CONVEYOR_WORKER_PASSWORD": ""})
    assert missing.returncode != 0
    assert (
        "CONVEYOR_WORKER_PASSWORD (or CONVEYOR_WORKER_PASSWORD_FILE) must be set" in missing.stderr
    )
    for done in (both, absent, missing):
        assert "Traceback" not in done.stderr
