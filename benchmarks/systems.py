"""The four systems, each behind the same small interface the runner drives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pika

from benchmarks import raw_amqp
from benchmarks.environment import Services, pika_parameters
from tests.infra import ROOT, compose_command, stop_process


class Worker:
    """A worker process tree started from a command line; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, 30)


class System:
    name = ""
    queue = ""

    def __init__(self, services: Services, workdir: Path) -> None:
        self.services = services
        self.workdir = workdir
        self.env = {
            **os.environ,
            "CELERY_BROKER_URL": services.broker_url,
            "CELERY_RESULT_BACKEND": f"{services.redis_url}/0",
            "BENCH_REDIS_URL": f"{services.redis_url}/1",
            "PYTHONPATH": str(ROOT),
        }

    def worker_argv(self) -> list[str]:
        raise NotImplementedError

    def start_worker(self) -> Worker:
        return Worker(self.worker_argv(), self.env, self.workdir / f"{self.name}-worker.log")

    def fill(self, count: int) -> None:
        """Put `count` no-op messages in the queue (untimed)."""
        for _ in range(count):
            self.send_noop()

    def send_noop(self) -> None:
        raise NotImplementedError

    def send_latency(self, sent: float) -> None:
        raise NotImplementedError

    def purge(self) -> None:
        connection = pika.BlockingConnection(pika_parameters(self.services.broker_url))
        try:
            connection.channel().queue_purge(self.queue)
        finally:
            connection.close()

    def close(self) -> None:
        pass


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class RawAmqp(System):
    name = "raw_amqp"
    queue = raw_amqp.QUEUE

    def __init__(self, services: Services, workdir: Path) -> None:
        super().__init__(services, workdir)
        self.publisher = raw_amqp.ConfirmedPublisher(services.broker_url)

    def worker_argv(self) -> list[str]:
        url = self.services.broker_url
        return [sys.executable, "-m", "benchmarks.raw_amqp", "consume", url, self.queue]

    def fill(self, count: int) -> None:
        raw_amqp.publish_pipelined(self.services.broker_url, count, self.queue)

    def send_noop(self) -> None:
        self.publisher.publish({"n": 0})

    def send_latency(self, sent: float) -> None:
        self.publisher.publish({"sent": sent})

    def close(self) -> None:
        self.publisher.close()


class _CeleryBased(System):
    """Shared by Conveyor and stock Celery: they differ only in app and configuration."""

    app_module = ""

    def __init__(self, services: Services, workdir: Path) -> None:
        super().__init__(services, workdir)
        os.environ.update(
            CELERY_BROKER_URL=services.broker_url,
            CELERY_RESULT_BACKEND=f"{services.redis_url}/0",
        )
        module = __import__(self.app_module, fromlist=["noop", "latency", "app"])
        module.app.conf.update(
            broker_url=services.broker_url, result_backend=f"{services.redis_url}/0"
        )
        self.app, self.noop, self.latency = module.app, module.noop, module.latency

    def send_noop(self) -> None:
        self.noop.delay()

    def send_latency(self, sent: float) -> None:
        self.latency.delay(sent)

    def close(self) -> None:
        self.app.close()


class Conveyor(_CeleryBased):
    """Conveyor's production configuration and worker command (compose.yaml's)."""

    name = "conveyor"
    queue = "default"
    app_module = "benchmarks.conveyor_tasks"

    def worker_argv(self) -> list[str]:
        command = compose_command("worker")
        return [
            _bin("celery"),
            *command[1:],
            "--concurrency=2",
            f"--hostname=bench-{os.getpid()}@%h",
            "--include=benchmarks.conveyor_tasks",
        ]


class CeleryStock(_CeleryBased):
    name = "celery_stock"
    queue = "bench_stock"
    app_module = "benchmarks.stock_app"

    def worker_argv(self) -> list[str]:
        return [
            _bin("celery"),
            "-A",
            "benchmarks.stock_app",
            "worker",
            "--concurrency=2",
            f"--hostname=stock-{os.getpid()}@%h",
        ]


class Dramatiq(System):
    name = "dramatiq"
    queue = "bench_dramatiq"

    def __init__(self, services: Services, workdir: Path) -> None:
        super().__init__(services, workdir)
        os.environ["CELERY_BROKER_URL"] = services.broker_url
        from benchmarks import dramatiq_app

        self.module = dramatiq_app
        self.env["dramatiq_queue_prefetch"] = "1"

    def worker_argv(self) -> list[str]:
        return [_bin("dramatiq"), "benchmarks.dramatiq_app", "--processes", "2", "--threads", "1"]

    def send_noop(self) -> None:
        self.module.noop.send()

    def send_latency(self, sent: float) -> None:
        self.module.latency.send(sent)

    def close(self) -> None:
        self.module.broker.close()


ALL: list[type[System]] = [RawAmqp, Conveyor, CeleryStock, Dramatiq]
