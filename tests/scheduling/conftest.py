"""Real beat processes (compose.yaml's beat command) and a worker for the scheduling tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import StartWorker
from tests.infra import ROOT, WorkerProcess, compose_command, stop_process, wait_for

#: What beat logs when it takes the lock (tasks/schedule/scheduler.py).
ACTIVE_LINE = "this beat is now the active one"
#: Test task modules the scheduling worker loads besides tests.worker_tasks.
INCLUDE = ("tests.scheduling.tasks",)
#: What a beat logs, once, when another beat holds the lock.
STANDBY_LINE = "beat: standby; lock"


@dataclass
class BeatProcess:
    """A real `celery -A tasks beat` process, started with compose.yaml's beat command."""

    broker_url: str
    redis_url: str
    key_prefix: str
    workdir: Path
    name: str = "beat"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node = f"celerybeat-{self.name}-{os.getpid()}@localhost"
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        command = compose_command("beat")
        assert command[0] == "celery"
        celery = str(Path(sys.executable).with_name("celery"))
        return [celery, *command[1:], f"--hostname={self.node}"]

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "CELERY_BROKER_URL": self.broker_url,
            "CELERY_RESULT_BACKEND": f"{self.redis_url}/0",
            "CONVEYOR_SCHEDULE_REDIS_URL": f"{self.redis_url}/0",
            "CELERY_REDBEAT_KEY_PREFIX": self.key_prefix,
            "CELERY_CONVEYOR_BEAT_BUILTIN_ENTRIES": "false",
            "PYTHONPATH": str(ROOT),
            **self.env,
        }

    def start(self) -> BeatProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.workdir,  # beat writes nothing here with redbeat; keep it out of the repo
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: self._exited_early() or "beat: Starting..." in self.log(),
            60,
            what=f"beat {self.name} to start (log: {self.log_path})",
        )
        return self

    def _exited_early(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"beat exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_active(self) -> bool:
        return ACTIVE_LINE in self.log()

    def became_active_at(self) -> float:
        """When this beat took the lock (epoch seconds, from its log line)."""
        line = next(line for line in self.log().splitlines() if ACTIVE_LINE in line)
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        return time.mktime(stamp.timetuple()) + stamp.microsecond / 1e6

    def kill(self) -> None:
        """SIGKILL: the lock is not released, as after a crash or an OOM kill."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        return stop_process(self.process, timeout)


@pytest.fixture(scope="module")
def sched_worker(
    conveyor_app: Any, broker_url: str, result_backend: str, start_worker: StartWorker
) -> Iterator[WorkerProcess]:
    """A real worker serving every queue, with the scheduling test tasks, concurrency 2."""
    with start_worker(
        "sched-worker",
        broker_url=broker_url,
        include=INCLUDE,
        env={"CONVEYOR_SCHEDULE_REDIS_URL": result_backend},
    ) as process:
        await_delayed_delivery()
        yield process


def await_delayed_delivery(connection: Any = None) -> None:
    """Return once a delayed job makes the round trip (a publish, then a delivery).

    The worker's readiness file can appear before its DelayedDelivery step has declared the
    delay exchanges on a fresh broker (both steps only require Tasks), and a delayed publish
    before that is dropped as unroutable.
    """
    from amqp.exceptions import NotFound
    from celery.exceptions import TimeoutError as ResultTimeout

    from tests import worker_tasks

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            # NotFound: the delay exchanges are not declared yet; a timeout: the queue's
            # binding to them was not there yet when the delay ended.
            worker_tasks.add.apply_async((1, 1), countdown=1, connection=connection).get(timeout=5)
            return
        except (NotFound, ResultTimeout):
            time.sleep(0.5)
    pytest.fail("no delayed job made the round trip in 60 s")


@pytest.fixture
def schedule_app(conveyor_app: Any, result_backend: str) -> Iterator[Any]:
    """The project's app, its schedule under a key prefix of its own for this test."""
    import tests.scheduling.tasks  # noqa: F401  registers the tasks for validation

    prefix = f"redbeat-test-{uuid.uuid4().hex[:8]}:"
    conveyor_app.conf.update(redbeat_redis_url=result_backend, redbeat_key_prefix=prefix)
    for cached in ("redbeat_conf", "redbeat_redis"):
        conveyor_app.__dict__.pop(cached, None)
    yield conveyor_app
    client = redis.Redis.from_url(result_backend)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    for cached in ("redbeat_conf", "redbeat_redis"):
        conveyor_app.__dict__.pop(cached, None)


@dataclass
class Scheduling:
    """One test's scheduling harness: the app, its ledger and the beats it started."""

    app: Any
    ledger: redis.Redis
    worker: WorkerProcess
    workdir: Path
    broker_url: str
    redis_url: str
    started: list[BeatProcess] = field(default_factory=list)

    def new_beat(self, name: str, node: str | None = None) -> BeatProcess:
        beat = BeatProcess(
            broker_url=self.broker_url,
            redis_url=self.redis_url,
            key_prefix=self.app.conf.redbeat_key_prefix,
            workdir=self.workdir / name,
            name=name,
        )
        if node is not None:  # beats on one host share their node name, celerybeat@<host>
            beat.node = node
        self.started.append(beat)
        return beat

    def beat(self, name: str, node: str | None = None) -> BeatProcess:
        return self.new_beat(name, node).start()

    def runs(self, key: str, event: str = "start") -> list[dict[str, Any]]:
        return runs(self.ledger, key, event)

    def wait_for_runs(self, key: str, count: int, timeout: float) -> list[Any]:
        return wait_for_runs(self.ledger, key, count, timeout)


@pytest.fixture
def sched(
    tmp_path: Path,
    sched_worker: WorkerProcess,
    schedule_app: Any,
    ledger: redis.Redis,
    broker_url: str,
    redis_url: str,
) -> Iterator[Scheduling]:
    """The harness for one test; every beat it started is stopped afterwards."""
    harness = Scheduling(schedule_app, ledger, sched_worker, tmp_path, broker_url, redis_url)
    yield harness
    for beat in harness.started:
        beat.stop()


def celery_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `celery -A tasks ...` as an operator would, with `env` added."""
    celery = str(Path(sys.executable).with_name("celery"))
    return subprocess.run(
        [celery, "-A", "tasks", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def runs(ledger: redis.Redis, key: str, event: str = "start") -> list[dict[str, Any]]:
    rows = [json.loads(raw) for raw in ledger.lrange(f"runs:{key}", 0, -1)]
    return [row for row in rows if row["event"] == event]


def wait_for_runs(ledger: redis.Redis, key: str, count: int, timeout: float) -> list[Any]:
    return list(
        wait_for(
            lambda: (found := runs(ledger, key)) and len(found) >= count and found,
            timeout,
            what=f"{count} runs of {key}",
        )
    )


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))
