"""Fixtures of the outbox tests: a fresh PostgreSQL database per session and relay processes.

The database is created on the PostgreSQL server at CONVEYOR_TEST_POSTGRES_URL (default: the
local server on 127.0.0.1:5432 as `postgres`, trust auth; .ci/run starts one) and dropped at the
end, as pytest-postgresql's `postgresql_noproc` does: pg_ctl refuses to run as root, so the
suite uses the running server instead of starting its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from outbox.cli import migrate_database
from tests.infra import ROOT, require, stop_process, wait_for

SERVER_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _server_reachable() -> bool:
    try:
        with psycopg.connect(SERVER_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def outbox_url() -> Iterator[str]:
    """A new database with the outbox schema, dropped after the session."""
    require(_server_reachable(), f"no PostgreSQL at {SERVER_URL} (.ci/run starts one)")
    name = f"conveyor_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = urlsplit(SERVER_URL)._replace(path=f"/{name}").geturl()
    migrate_database(url)
    yield url
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture
def outbox_db(outbox_url: str) -> Iterator[str]:
    """The outbox database, emptied before the test."""
    with psycopg.connect(outbox_url, autocommit=True) as db:
        db.execute("TRUNCATE conveyor_outbox, conveyor_outbox_counters")
    yield outbox_url


def waiting_rows(url: str) -> int:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT count(*) FROM conveyor_outbox WHERE published_at IS NULL")
        return int(row.fetchone()[0])  # type: ignore[index]


@dataclass
class RelayProcess:
    """A real `celery -A tasks outbox relay` process."""

    broker_url: str
    outbox_url: str
    workdir: Path
    name: str = "relay"
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, wait: bool = True) -> RelayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        celery = str(Path(sys.executable).with_name("celery"))
        env = {
            **os.environ,
            "CELERY_BROKER_URL": self.broker_url,
            "CONVEYOR_OUTBOX_URL": self.outbox_url,
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        self.process = subprocess.Popen(
            [celery, "-A", "tasks", "outbox", "relay"],
            cwd=ROOT,
            env=env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: "outbox relay started" in self.log(), 60, what=f"relay ({self.log_path})")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost node would."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int | None:
        return stop_process(self.process, 20)


RelayFactory = Callable[..., RelayProcess]


@pytest.fixture
def start_relay(tmp_path: Path, outbox_url: str) -> Iterator[RelayFactory]:
    """Start relay processes against the session's database; all stopped after the test."""
    started: list[RelayProcess] = []

    def start(broker_url: str, name: str = "relay", wait: bool = True, **env: str) -> RelayProcess:
        relay = RelayProcess(broker_url, outbox_url, tmp_path, name=name, env=env).start(wait)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def connect(url: str) -> Any:
    """A psycopg 3 connection as a web request would hold (not autocommit)."""
    return psycopg.connect(url)
